"""HF tensor names and layouts <-> the smoljax parameter pytree, for the SmolLM2 decoder.

HF stores per-layer `nn.Linear` weights as [out, in]; smoljax stacks layers on a leading axis and keeps weights as
[in, out] with heads split out, so matmuls are plain einsums and heads can be sharded. Every checkpoint format
(safetensors, GGUF) is read into HF names first and converted here, in one place.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from smoljax.config import LlamaConfig
from smoljax.errors import CheckpointError

# Per-layer HF names (after `model.layers.{i}.`) -> smoljax names under `layers/`.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.o_proj.weight": "o_proj",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj",
}


def expected_hf_shapes(config: LlamaConfig, prefix: str = "model.", head: str = "lm_head.weight",
                       ) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this config. `prefix` is where the decoder lives (`model.text_model.` in VLMs)."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (mlp, hidden),
        "mlp.up_proj.weight": (mlp, hidden),
        "mlp.down_proj.weight": (hidden, mlp),
    }
    shapes = {f"{prefix}embed_tokens.weight": (config.vocab_size, hidden), f"{prefix}norm.weight": (hidden,)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"{prefix}layers.{i}.{name}": shape for name, shape in per_layer.items()})
    if not config.tie_word_embeddings:
        shapes[head] = (config.vocab_size, hidden)
    return shapes


def _hf_to_layer_param(name: str, weight: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """One layer's HF weight [out, in] -> smoljax layout (see smoljax.params)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if name == "q_proj":
        return weight.T.reshape(config.hidden_size, heads, head_dim)
    if name in ("k_proj", "v_proj"):
        return weight.T.reshape(config.hidden_size, kv_heads, head_dim)
    if name == "o_proj":
        return weight.T.reshape(heads, head_dim, config.hidden_size)
    if name in ("gate_proj", "up_proj", "down_proj"):
        return weight.T
    return weight  # norms


def _layer_param_to_hf(name: str, value: np.ndarray) -> np.ndarray:
    """Inverse of `_hf_to_layer_param` for one layer."""
    if name in ("q_proj", "k_proj", "v_proj"):
        return value.reshape(value.shape[0], -1).T
    if name == "o_proj":
        return value.reshape(-1, value.shape[-1]).T
    if name in ("gate_proj", "up_proj", "down_proj"):
        return value.T
    return value


def hf_to_params(tensors: Mapping[str, np.ndarray], config: LlamaConfig, dtype: Any = np.float32,
                 prefix: str = "model.", head: str = "lm_head.weight", source: str = "checkpoint",
                 ) -> dict[str, Any]:
    """Builds the parameter pytree from HF-named numpy tensors, checking names and shapes first.

    A checkpoint that carries `lm_head.weight` for a tied config keeps it only if it differs from the embedding;
    one without it for an untied config is an error.
    """
    import jax.numpy as jnp

    tensors = dict(tensors)
    if config.tie_word_embeddings and head in tensors:
        del tensors[head]  # tied: transformers may save the shared matrix twice
    from smoljax.checkpoints.safetensors_io import check_tensor_names
    check_tensor_names({k: tuple(v.shape) for k, v in tensors.items()}, expected_hf_shapes(config, prefix, head),
                       source)

    def as_array(x: np.ndarray):
        return jnp.asarray(np.asarray(x), dtype=dtype)

    layers = {}
    for hf_name, name in LAYER_TENSORS.items():
        stacked = np.stack([_hf_to_layer_param(name, tensors[f"{prefix}layers.{i}.{hf_name}"], config)
                            for i in range(config.num_hidden_layers)])
        layers[name] = as_array(stacked)
    params = {
        "embed": as_array(tensors[f"{prefix}embed_tokens.weight"]),
        "layers": layers,
        "final_norm": as_array(tensors[f"{prefix}norm.weight"]),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = as_array(np.asarray(tensors[head]).T)
    return params


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig, prefix: str = "model.",
                 head: str = "lm_head.weight") -> dict[str, np.ndarray]:
    """The parameter pytree as HF-named numpy tensors in HF layouts (dtype kept)."""
    out = {f"{prefix}embed_tokens.weight": np.asarray(params["embed"]),
           f"{prefix}norm.weight": np.asarray(params["final_norm"])}
    for hf_name, name in LAYER_TENSORS.items():
        stacked = np.asarray(params["layers"][name])
        if stacked.shape[0] != config.num_hidden_layers:
            raise CheckpointError(f"params hold {stacked.shape[0]} layers but the config says "
                                  f"{config.num_hidden_layers}; save with the config the params came from")
        for i in range(config.num_hidden_layers):
            out[f"{prefix}layers.{i}.{hf_name}"] = np.ascontiguousarray(_layer_param_to_hf(name, stacked[i]))
    if "lm_head" in params:
        out[head] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    return out
