"""One tree of parameter specs drives random init, `jax.eval_shape`, shardings and checkpoint loading.

A spec holds a shape, a dtype, logical axis names and an initializer. Because every consumer reads the same tree,
the loader, the initializer and the sharding rules cannot disagree about a parameter.

SmolLM2 parameter tree (L layers stacked on the leading axis so `lax.scan` runs them):

    embed        [vocab, hidden]
    layers/
      attn_norm  [L, hidden]
      q_proj     [L, hidden, q_heads, head_dim]
      k_proj     [L, hidden, kv_heads, head_dim]
      v_proj     [L, hidden, kv_heads, head_dim]
      o_proj     [L, q_heads, head_dim, hidden]
      mlp_norm   [L, hidden]
      gate_proj  [L, hidden, mlp]
      up_proj    [L, hidden, mlp]
      down_proj  [L, mlp, hidden]
    final_norm   [hidden]
    lm_head      [hidden, vocab]       (only when the embedding is not tied)

SigLIP vision encoder (`siglip_specs`; P = patch size, C = channels, N = patches per tile):

    patch_embed  [C * P * P, hidden]   the patch conv as a matmul over flattened (channel, row, column) patches
    patch_bias   [hidden]
    position_embed [N, hidden]
    layers/      ln1_scale, ln1_bias, ln2_scale, ln2_bias [L, hidden]
                 q_proj, k_proj, v_proj [L, hidden, heads, head_dim]; q_bias, k_bias, v_bias [L, heads, head_dim]
                 o_proj [L, heads, head_dim, hidden]; o_bias [L, hidden]
                 fc1 [L, hidden, mlp]; fc1_bias [L, mlp]; fc2 [L, mlp, hidden]; fc2_bias [L, hidden]
    post_norm_scale, post_norm_bias [hidden]

SmolVLM2 (`vlm_specs`): {"vision": SigLIP tree, "connector": {"proj": [hidden_vision * scale^2, hidden_text]},
"text": the SmolLM2 tree}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from smoljax.config import LlamaConfig, VisionConfig, VLMConfig

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What one parameter is: its shape, dtype, a logical name per axis, and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Initializer
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def normal_init(stddev: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def ones_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def llama_specs(config: LlamaConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The spec tree of a SmolLM2 decoder; see the module docstring for the layout."""
    hidden, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q_heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    std = config.initializer_range
    # Residual-branch outputs are scaled down with depth (GPT-2 style) so a fresh model starts stable.
    out_std = std / math.sqrt(2 * layers)

    def spec(shape, axes, init=normal_init(std)) -> ParamSpec:
        return ParamSpec(tuple(shape), tuple(axes), init, dtype)

    tree: dict[str, Any] = {
        "embed": spec((config.vocab_size, hidden), ("vocab", "embed")),
        "layers": {
            "attn_norm": spec((layers, hidden), ("layers", "norm"), ones_init),
            "q_proj": spec((layers, hidden, q_heads, head_dim), ("layers", "embed", "q_heads", "head_dim")),
            "k_proj": spec((layers, hidden, kv_heads, head_dim), ("layers", "embed", "kv_heads", "head_dim")),
            "v_proj": spec((layers, hidden, kv_heads, head_dim), ("layers", "embed", "kv_heads", "head_dim")),
            "o_proj": spec((layers, q_heads, head_dim, hidden), ("layers", "q_heads", "head_dim", "embed"),
                           normal_init(out_std)),
            "mlp_norm": spec((layers, hidden), ("layers", "norm"), ones_init),
            "gate_proj": spec((layers, hidden, mlp), ("layers", "embed", "mlp")),
            "up_proj": spec((layers, hidden, mlp), ("layers", "embed", "mlp")),
            "down_proj": spec((layers, mlp, hidden), ("layers", "mlp", "embed"), normal_init(out_std)),
        },
        "final_norm": spec((hidden,), ("norm",), ones_init),
    }
    if not config.tie_word_embeddings:
        tree["lm_head"] = spec((hidden, config.vocab_size), ("embed", "vocab"))
    return tree


def zeros_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def siglip_specs(config: VisionConfig, dtype: Any = jnp.float32, std: float = 0.02) -> dict[str, Any]:
    """The spec tree of the SigLIP vision encoder; see the module docstring for the layout."""
    hidden, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, head_dim = config.num_attention_heads, config.head_dim
    patch_features = config.num_channels * config.patch_size ** 2

    def spec(shape, axes, init=normal_init(std)) -> ParamSpec:
        return ParamSpec(tuple(shape), tuple(axes), init, dtype)

    def norm(shape, axes):
        return spec(shape, axes, ones_init), spec(shape, axes, zeros_init)

    ln1_scale, ln1_bias = norm((layers, hidden), ("layers", "norm"))
    ln2_scale, ln2_bias = norm((layers, hidden), ("layers", "norm"))
    post_scale, post_bias = norm((hidden,), ("norm",))
    qkv = ((layers, hidden, heads, head_dim), ("layers", "embed", "q_heads", "head_dim"))
    qkv_bias = ((layers, heads, head_dim), ("layers", "q_heads", "head_dim"))
    return {
        "patch_embed": spec((patch_features, hidden), ("patch", "embed")),
        "patch_bias": spec((hidden,), ("norm",), zeros_init),
        "position_embed": spec((config.num_patches, hidden), ("positions", "embed")),
        "layers": {
            "ln1_scale": ln1_scale, "ln1_bias": ln1_bias,
            "q_proj": spec(*qkv), "k_proj": spec(*qkv), "v_proj": spec(*qkv),
            "q_bias": spec(*qkv_bias, zeros_init), "k_bias": spec(*qkv_bias, zeros_init),
            "v_bias": spec(*qkv_bias, zeros_init),
            "o_proj": spec((layers, heads, head_dim, hidden), ("layers", "q_heads", "head_dim", "embed")),
            "o_bias": spec((layers, hidden), ("layers", "norm"), zeros_init),
            "ln2_scale": ln2_scale, "ln2_bias": ln2_bias,
            "fc1": spec((layers, hidden, mlp), ("layers", "embed", "mlp")),
            "fc1_bias": spec((layers, mlp), ("layers", "mlp"), zeros_init),
            "fc2": spec((layers, mlp, hidden), ("layers", "mlp", "embed")),
            "fc2_bias": spec((layers, hidden), ("layers", "norm"), zeros_init),
        },
        "post_norm_scale": post_scale,
        "post_norm_bias": post_bias,
    }


def vlm_specs(config: VLMConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The spec tree of a SmolVLM2: vision encoder, connector projection and text decoder."""
    proj_shape = (config.connector_in_features, config.text.hidden_size)
    return {
        "vision": siglip_specs(config.vision, dtype),
        "connector": {"proj": ParamSpec(proj_shape, ("patch", "embed"), normal_init(0.02), dtype)},
        "text": llama_specs(config.text, dtype),
    }


def model_specs(config: LlamaConfig | VLMConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The spec tree of any model config: `vlm_specs` for a VLMConfig, `llama_specs` for a LlamaConfig."""
    return vlm_specs(config, dtype) if isinstance(config, VLMConfig) else llama_specs(config, dtype)


def init_params(specs: Any, key: jax.Array) -> Any:
    """Random parameters for a spec tree. Jit it (with `specs` static via closure) for large models."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [s.init(k, s.shape, s.dtype) for s, k in zip(leaves, keys)])


def abstract_params(specs: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves: what `jax.eval_shape` of `init_params` gives, without computing anything."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)


def count_params(tree: Any) -> int:
    """Total number of scalars in a tree of arrays, specs or shape structs."""
    leaves = jax.tree.leaves(tree, is_leaf=is_spec)
    return int(sum(math.prod(leaf.shape) for leaf in leaves))


def param_breakdown(tree: Any) -> dict[str, int]:
    """Scalar counts per top-level component (`embed`, `layers/q_proj`, ...)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]
    return {"/".join(_key_name(k) for k in path): int(math.prod(leaf.shape)) for path, leaf in flat}


def cast_params(params: Any, dtype: Any) -> Any:
    """Casts floating-point leaves to `dtype` (e.g. f32 master weights to bf16 for serving)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, params)


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))

