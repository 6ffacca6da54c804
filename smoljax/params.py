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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from smoljax.config import LlamaConfig

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

