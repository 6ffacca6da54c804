"""HF tensor names and layouts <-> the smoljax parameter pytree, for the SmolLM2 decoder.

HF stores per-layer `nn.Linear` weights as [out, in]; smoljax stacks layers on a leading axis and keeps weights as
[in, out] with heads split out, so matmuls are plain einsums and heads can be sharded. Every checkpoint format
(safetensors, GGUF) is read into HF names first and converted here, in one place.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from smoljax.config import LlamaConfig, VLMConfig
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


# ---- SmolVLM2 (vision encoder + connector + the decoder above under `model.text_model.`) ----

VISION_PREFIX = "model.vision_model."
CONNECTOR_WEIGHT = "model.connector.modality_projection.proj.weight"
VLM_TEXT_PREFIX = "model.text_model."

# Per-layer HF names (after `model.vision_model.encoder.layers.{i}.`) -> smoljax names under `vision/layers/`.
VISION_LAYER_TENSORS = {
    "layer_norm1.weight": "ln1_scale", "layer_norm1.bias": "ln1_bias",
    "self_attn.q_proj.weight": "q_proj", "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.weight": "k_proj", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.weight": "v_proj", "self_attn.v_proj.bias": "v_bias",
    "self_attn.out_proj.weight": "o_proj", "self_attn.out_proj.bias": "o_bias",
    "layer_norm2.weight": "ln2_scale", "layer_norm2.bias": "ln2_bias",
    "mlp.fc1.weight": "fc1", "mlp.fc1.bias": "fc1_bias",
    "mlp.fc2.weight": "fc2", "mlp.fc2.bias": "fc2_bias",
}


def expected_vlm_shapes(config: VLMConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a SmolVLM2 config."""
    vision = config.vision
    hidden, mlp = vision.hidden_size, vision.intermediate_size
    per_layer = {
        "layer_norm1.weight": (hidden,), "layer_norm1.bias": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.q_proj.bias": (hidden,),
        "self_attn.k_proj.weight": (hidden, hidden), "self_attn.k_proj.bias": (hidden,),
        "self_attn.v_proj.weight": (hidden, hidden), "self_attn.v_proj.bias": (hidden,),
        "self_attn.out_proj.weight": (hidden, hidden), "self_attn.out_proj.bias": (hidden,),
        "layer_norm2.weight": (hidden,), "layer_norm2.bias": (hidden,),
        "mlp.fc1.weight": (mlp, hidden), "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (hidden, mlp), "mlp.fc2.bias": (hidden,),
    }
    shapes = {
        f"{VISION_PREFIX}embeddings.patch_embedding.weight":
            (hidden, vision.num_channels, vision.patch_size, vision.patch_size),
        f"{VISION_PREFIX}embeddings.patch_embedding.bias": (hidden,),
        f"{VISION_PREFIX}embeddings.position_embedding.weight": (vision.num_patches, hidden),
        f"{VISION_PREFIX}post_layernorm.weight": (hidden,),
        f"{VISION_PREFIX}post_layernorm.bias": (hidden,),
        CONNECTOR_WEIGHT: (config.text.hidden_size, config.connector_in_features),
    }
    for i in range(vision.num_hidden_layers):
        shapes.update({f"{VISION_PREFIX}encoder.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes.update(expected_hf_shapes(config.text, VLM_TEXT_PREFIX))
    return shapes


def _hf_to_vision_layer_param(name: str, weight: np.ndarray, config: VLMConfig) -> np.ndarray:
    heads, head_dim = config.vision.num_attention_heads, config.vision.head_dim
    if name in ("q_proj", "k_proj", "v_proj"):
        return weight.T.reshape(-1, heads, head_dim)
    if name in ("q_bias", "k_bias", "v_bias"):
        return weight.reshape(heads, head_dim)
    if name == "o_proj":
        return weight.T.reshape(heads, head_dim, -1)
    if name in ("fc1", "fc2"):
        return weight.T
    return weight


def _vision_layer_param_to_hf(name: str, value: np.ndarray) -> np.ndarray:
    if name in ("q_proj", "k_proj", "v_proj"):
        return value.reshape(value.shape[0], -1).T
    if name in ("q_bias", "k_bias", "v_bias"):
        return value.reshape(-1)
    if name == "o_proj":
        return value.reshape(-1, value.shape[-1]).T
    if name in ("fc1", "fc2"):
        return value.T
    return value


def hf_to_vlm_params(tensors: Mapping[str, np.ndarray], config: VLMConfig, dtype: Any = np.float32,
                     source: str = "checkpoint") -> dict[str, Any]:
    """The SmolVLM2 parameter pytree {vision, connector, text} from HF-named tensors, names and shapes checked."""
    import jax.numpy as jnp

    from smoljax.checkpoints.safetensors_io import check_tensor_names

    tensors = dict(tensors)
    if config.text.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    check_tensor_names({k: tuple(v.shape) for k, v in tensors.items()}, expected_vlm_shapes(config), source)

    def as_array(x: np.ndarray):
        return jnp.asarray(np.asarray(x), dtype=dtype)

    layer_prefix = f"{VISION_PREFIX}encoder.layers"
    layers = {name: as_array(np.stack([
        _hf_to_vision_layer_param(name, tensors[f"{layer_prefix}.{i}.{hf_name}"], config)
        for i in range(config.vision.num_hidden_layers)])) for hf_name, name in VISION_LAYER_TENSORS.items()}
    patch_weight = np.asarray(tensors[f"{VISION_PREFIX}embeddings.patch_embedding.weight"])
    vision = {
        "patch_embed": as_array(patch_weight.reshape(patch_weight.shape[0], -1).T),
        "patch_bias": as_array(tensors[f"{VISION_PREFIX}embeddings.patch_embedding.bias"]),
        "position_embed": as_array(tensors[f"{VISION_PREFIX}embeddings.position_embedding.weight"]),
        "layers": layers,
        "post_norm_scale": as_array(tensors[f"{VISION_PREFIX}post_layernorm.weight"]),
        "post_norm_bias": as_array(tensors[f"{VISION_PREFIX}post_layernorm.bias"]),
    }
    text_tensors = {k: v for k, v in tensors.items() if k.startswith(VLM_TEXT_PREFIX) or k == "lm_head.weight"}
    return {
        "vision": vision,
        "connector": {"proj": as_array(np.asarray(tensors[CONNECTOR_WEIGHT]).T)},
        "text": hf_to_params(text_tensors, config.text, dtype, prefix=VLM_TEXT_PREFIX, source=source),
    }


def vlm_params_to_hf(params: Mapping[str, Any], config: VLMConfig) -> dict[str, np.ndarray]:
    """The SmolVLM2 parameter pytree as HF-named numpy tensors in HF layouts (dtype kept)."""
    vision = params["vision"]
    vc = config.vision
    patch = np.asarray(vision["patch_embed"]).T.reshape(vc.hidden_size, vc.num_channels, vc.patch_size,
                                                         vc.patch_size)
    out = {
        f"{VISION_PREFIX}embeddings.patch_embedding.weight": np.ascontiguousarray(patch),
        f"{VISION_PREFIX}embeddings.patch_embedding.bias": np.asarray(vision["patch_bias"]),
        f"{VISION_PREFIX}embeddings.position_embedding.weight": np.asarray(vision["position_embed"]),
        f"{VISION_PREFIX}post_layernorm.weight": np.asarray(vision["post_norm_scale"]),
        f"{VISION_PREFIX}post_layernorm.bias": np.asarray(vision["post_norm_bias"]),
        CONNECTOR_WEIGHT: np.ascontiguousarray(np.asarray(params["connector"]["proj"]).T),
    }
    for hf_name, name in VISION_LAYER_TENSORS.items():
        stacked = np.asarray(vision["layers"][name])
        for i in range(stacked.shape[0]):
            out[f"{VISION_PREFIX}encoder.layers.{i}.{hf_name}"] = np.ascontiguousarray(
                _vision_layer_param_to_hf(name, stacked[i]))
    out.update(params_to_hf(params["text"], config.text, prefix=VLM_TEXT_PREFIX))
    return out
