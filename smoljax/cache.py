"""The KV cache: a pytree of fixed-size buffers that prefill fills and each decode step appends to.

Rows of a batch are left-padded to a common length, so every row writes at the same slot `end`; empty and padding
slots carry segment 0 and are never attended to. Positions are stored per slot because, with left padding, a slot
index is not a token position.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from smoljax.config import LlamaConfig


class KVCache(NamedTuple):
    k: jax.Array          # [layers, B, S, kv_heads, head_dim]
    v: jax.Array          # [layers, B, S, kv_heads, head_dim]
    positions: jax.Array  # [B, S] int32: token position held in each slot
    segments: jax.Array   # [B, S] int32: 0 for empty or padding slots
    end: jax.Array        # [] int32: next slot to write

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens."""
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        positions=jnp.zeros((batch, max_length), jnp.int32),
        segments=jnp.zeros((batch, max_length), jnp.int32),
        end=jnp.zeros((), jnp.int32),
    )


def write_metadata(cache: KVCache, positions: jax.Array, segments: jax.Array) -> KVCache:
    """Records positions/segments [B, T] of T new tokens at slot `end` (the K/V rows are written per layer)."""
    start = (0, cache.end)
    return cache._replace(
        positions=jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), start),
        segments=jax.lax.dynamic_update_slice(cache.segments, segments.astype(jnp.int32), start),
    )
