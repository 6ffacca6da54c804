"""The SmolLM2 decoder: embed -> scan(layers) -> RMSNorm -> LM head, as pure functions over a parameter pytree.

`forward` runs a whole sequence (training, scoring). `forward_with_cache` runs new tokens against a KV cache
(prefill and decode). Both share `decoder_stack`, which the vision-language model reuses with its own embeddings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from smoljax import nn
from smoljax.attention import Implementation, attention
from smoljax.cache import KVCache, write_metadata
from smoljax.config import LlamaConfig
from smoljax.errors import InputError

Params = dict[str, Any]

# Remat policies by name: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = ("none", "full", "dots", "save_attn_mlp")


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.dots_with_no_batch_dims_saveable,
        "save_attn_mlp": policies.save_only_these_names("attn_out", "mlp_out"),
    }[name]


def check_token_ids(tokens: Any, vocab_size: int) -> None:
    """Raises InputError for ids outside [0, vocab_size). Skipped under tracing, where values are unknown."""
    if isinstance(tokens, jax.core.Tracer):
        return
    ids = np.asarray(tokens)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise InputError(f"token id {bad} is out of range: the model's vocabulary has ids 0..{vocab_size - 1}")


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens: [B, T] int -> embeddings [B, T, hidden] in the parameters' dtype."""
    return jnp.take(params["embed"], tokens, axis=0)


def lm_logits(params: Params, hidden: jax.Array, config: LlamaConfig) -> jax.Array:
    """Final norm and LM head (tied to the embedding when there is no `lm_head`). [B, T, hidden] -> f32 [B, T, V]."""
    normed = nn.rms_norm(hidden, params["final_norm"], config.rms_norm_eps)
    if "lm_head" in params:
        return jnp.einsum("bth,hv->btv", normed, params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.einsum("bth,vh->btv", normed, params["embed"], preferred_element_type=jnp.float32)


def _attention_block(layer: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, config: LlamaConfig):
    """Pre-norm and the q/k/v projections with RoPE. x: [B, T, hidden] -> q [B,T,Hq,D], k, v [B,T,Hkv,D]."""
    normed = nn.rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    q = jnp.einsum("bth,hnd->btnd", normed, layer["q_proj"])
    k = jnp.einsum("bth,hnd->btnd", normed, layer["k_proj"])
    v = jnp.einsum("bth,hnd->btnd", normed, layer["v_proj"])
    return nn.apply_rope(q, cos, sin), nn.apply_rope(k, cos, sin), v


def _mlp_block(layer: Params, x: jax.Array, config: LlamaConfig) -> jax.Array:
    normed = nn.rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    out = nn.swiglu(normed, layer["gate_proj"], layer["up_proj"], layer["down_proj"])
    return checkpoint_name(out, "mlp_out")


def _output_projection(layer: Params, attn_out: jax.Array) -> jax.Array:
    attn_out = checkpoint_name(attn_out, "attn_out")
    return jnp.einsum("btnd,ndh->bth", attn_out, layer["o_proj"])


def decoder_stack(params: Params, x: jax.Array, config: LlamaConfig, *, positions: jax.Array,
                  segments: jax.Array, cache: KVCache | None = None, attn_impl: Implementation = "auto",
                  remat: str = "none", unroll: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Runs all decoder layers with `lax.scan`.

    x: [B, T, hidden] input embeddings; positions, segments: [B, T] (segment 0 = padding).
    Without a cache the T tokens attend to each other. With a cache they are written at slot `cache.end` and attend
    to everything the cache holds; the returned cache has `end` advanced by T.
    `unroll` unrolls the layer scan (one straight-line program; helps small decode steps on accelerators).
    Returns (hidden states [B, T, hidden] before the final norm, updated cache or None).
    """
    cos, sin = nn.rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    if cache is not None:
        cache = write_metadata(cache, positions, segments)
        kv_positions, kv_segments = cache.positions, cache.segments
    else:
        kv_positions, kv_segments = positions, segments

    def layer_step(carry, layer_and_index):
        x, k_all, v_all = carry
        layer, index = layer_and_index
        q, k, v = _attention_block(layer, x, cos, sin, config)
        if k_all is not None:
            # Write this layer's new rows in place, then attend over the whole cache buffer.
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (index, 0, cache.end, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (index, 0, cache.end, 0, 0))
            k, v = k_all[index].astype(q.dtype), v_all[index].astype(q.dtype)
        attn_out = attention(q, k, v, q_segments=segments, kv_segments=kv_segments, q_positions=positions,
                             kv_positions=kv_positions, causal=True, implementation=attn_impl)
        x = x + _output_projection(layer, attn_out)
        x = x + _mlp_block(layer, x, config)
        return (x, k_all, v_all), None

    if remat != "none":
        layer_step = jax.checkpoint(layer_step, policy=_remat_policy(remat), prevent_cse=False)
    layer_indices = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
    k_all = cache.k if cache is not None else None
    v_all = cache.v if cache is not None else None
    (x, k_all, v_all), _ = jax.lax.scan(layer_step, (x, k_all, v_all), (params["layers"], layer_indices),
                                           unroll=unroll)
    if cache is not None:
        cache = cache._replace(k=k_all, v=v_all, end=cache.end + x.shape[1])
    return x, cache


def forward(params: Params, tokens: jax.Array, config: LlamaConfig, *, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, attn_impl: Implementation = "auto",
            remat: str = "none") -> jax.Array:
    """Logits of a whole sequence.

    tokens: [B, T] int. segment_ids: [B, T] int, 0 marks padding (default: all ones); packed documents use
    distinct ids and never attend across. positions: [B, T] (default: counted from each row's first real token,
    restarting at each new segment). Returns f32 logits [B, T, vocab].
    """
    check_token_ids(tokens, config.vocab_size)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    hidden, _ = decoder_stack(params, embed(params, tokens), config, positions=positions, segments=segment_ids,
                              attn_impl=attn_impl, remat=remat)
    return lm_logits(params, hidden, config)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each change of segment id (padding counts as its own segment). [B,T]->[B,T]."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return (index - start_index).astype(jnp.int32)


def forward_with_cache(params: Params, tokens: jax.Array, cache: KVCache, config: LlamaConfig, *,
                       positions: jax.Array, segment_ids: jax.Array,
                       attn_impl: Implementation = "auto", unroll: bool = False) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens [B, T] against the cache: prefill (T = prompt) or one decode step (T = 1).

    Returns f32 logits [B, T, vocab] and the cache with the new tokens appended.
    """
    hidden, cache = decoder_stack(params, embed(params, tokens), config, positions=positions,
                                  segments=segment_ids, cache=cache, attn_impl=attn_impl, unroll=unroll)
    return lm_logits(params, hidden, config), cache
