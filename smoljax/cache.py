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


# Cache lengths are rounded up to whole blocks of the decode attention kernel (`whole_blocks`), which then reads
# the buffers in place instead of padding a copy.
CACHE_BLOCK = 64


def whole_blocks(tokens: int) -> int:
    """Slots to allocate for `tokens` tokens: the next multiple of `CACHE_BLOCK` (extra slots stay empty)."""
    return -(-tokens // CACHE_BLOCK) * CACHE_BLOCK


class KVCache(NamedTuple):
    # K and V rows: one stacked [layers, B, S, kv_heads, head_dim] array (what `lax.scan` over layers needs), or a
    # tuple of per-layer [B, S, kv_heads, head_dim] arrays (unrolled decoding: each layer's kernels then read their
    # own buffer in place, with no slice of a stacked one).
    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array  # [B, S] int32: token position held in each slot
    segments: jax.Array   # [B, S] int32: 0 for empty or padding slots
    end: jax.Array        # [] int32: next slot to write

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]

    @property
    def dtype(self):
        """The dtype the K/V rows are stored in."""
        return (self.k[0] if isinstance(self.k, tuple) else self.k).dtype


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.bfloat16, *,
               per_layer: bool = False) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens; `per_layer` gives the tuple form of K/V."""
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    if per_layer:
        return KVCache(
            k=tuple(jnp.zeros(shape[1:], dtype) for _ in range(shape[0])),
            v=tuple(jnp.zeros(shape[1:], dtype) for _ in range(shape[0])),
            positions=jnp.zeros((batch, max_length), jnp.int32),
            segments=jnp.zeros((batch, max_length), jnp.int32),
            end=jnp.zeros((), jnp.int32),
        )
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
