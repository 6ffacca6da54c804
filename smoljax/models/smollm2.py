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
from smoljax.attention import CacheView, Implementation, appends_in_kernel, attention, decode_appending
from smoljax.cache import KVCache, write_metadata
from smoljax.config import LlamaConfig
from smoljax.errors import InputError

Params = dict[str, Any]

# Remat policies by name: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = ("none", "full", "dots", "dots_attention", "save_attn_mlp")

# The forward primitives of the fused attention kernels (our Pallas kernels, splash on TPU, cuDNN through
# jax.nn.dot_product_attention): their outputs include the softmax statistics the backward kernel needs.
_ATTENTION_FORWARD_PRIMITIVES = frozenset({"pallas_call", "dot_product_attention_fwd_wrapper",
                                           "dot_product_attention_fwd"})


def _save_dots_and_attention(prim, *args, **params) -> bool:
    """Keep the matmul outputs and the attention kernel's outputs: the backward pass then recomputes only the
    elementwise work, not the attention forward (which "dots" alone would run a second time)."""
    if prim.name in _ATTENTION_FORWARD_PRIMITIVES:
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.dots_with_no_batch_dims_saveable,
        "dots_attention": _save_dots_and_attention,
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


def fuse_projections(params: Params) -> Params:
    """The serving layout of the layer weights: q/k/v stacked into one matrix and gate/up into another, and every
    projection stored [out, in].

    A one-token decode step is bound by the number of kernels, not by bytes. Fusing runs two matmuls where there
    were five; the [out, in] layout makes each small matmul (which XLA:GPU turns into multiply + reduce) a reduction
    over the contiguous axis, which fuses into a single kernel. Meant to run inside jit, where the rearrangement
    happens once per call, ahead of the decode loop.

    layers -> qkv_proj_t [L, (Hq + 2*Hkv) * D, H], o_proj_t [L, H, Hq * D], gate_up_proj_t [L, 2 * M, H],
    down_proj_t [L, H, M]; norms unchanged.
    """
    layers = dict(params["layers"])
    if "qkv_proj_t" in layers:
        return params
    num_layers, hidden = layers["q_proj"].shape[:2]
    qkv = jnp.concatenate([layers.pop(name) for name in ("q_proj", "k_proj", "v_proj")], axis=2)
    layers["qkv_proj_t"] = qkv.reshape(num_layers, hidden, -1).transpose(0, 2, 1)
    layers["o_proj_t"] = layers.pop("o_proj").reshape(num_layers, -1, hidden).transpose(0, 2, 1)
    gate_up = jnp.concatenate([layers.pop("gate_proj"), layers.pop("up_proj")], axis=2)
    layers["gate_up_proj_t"] = gate_up.transpose(0, 2, 1)
    layers["down_proj_t"] = layers.pop("down_proj").transpose(0, 2, 1)
    return {**params, "layers": layers}


def unstack_layers(params: Params) -> Params:
    """The layers as a list of per-layer trees instead of one tree stacked on a leading axis.

    `decoder_stack` runs a list of layers as straight-line code that reads each layer's own buffers. This is the
    layout a CPU decode loop wants: inside the loop, XLA:CPU materialises every slice of a stacked weight (the
    dynamic slice of a scan, or a static slice when unrolled) with a copy on each step, tripling a step's weight
    traffic. Call it inside jit ahead of the decode loop, where the slicing is done once per call (a second copy of
    the layer weights while generating).
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)]}


# Prompts of at least this many tokens in all written into the KV cache fold RMSNorm's weight into the projections
# that follow it and scale their outputs by 1/rms, so the normalised activations are never written out: the
# prompt's activations outweigh the layer's weights, and the fold rides on the copy that slices a layer's weights
# out of the stacked ones. A decode step (one token a row, at any batch) keeps the plain norm, where scaling the
# weights would be the larger pass; so does training, whose step measured slower with the fold (NOTES-kernels.md
# §23).
FOLD_NORM_MIN_TOKENS = 512


def _normed_projection(equation: str, x: jax.Array, norm_weight: jax.Array, weight: jax.Array, in_axis: int,
                       eps: float, fold: bool) -> jax.Array:
    """einsum(equation, rms_norm(x, norm_weight), weight) for x [B, T, hidden]; `in_axis` is the weight's hidden
    axis; `fold` moves the norm's weight into `weight` and its 1/rms after the product. Output [B, T, ...] in x's
    dtype."""
    if not fold:
        return jnp.einsum(equation, nn.rms_norm(x, norm_weight, eps), weight)
    scale_shape = [1] * weight.ndim
    scale_shape[in_axis] = -1
    folded = (weight.astype(jnp.float32) * norm_weight.astype(jnp.float32).reshape(scale_shape)).astype(weight.dtype)
    out = jnp.einsum(equation, x, folded)
    inverse = nn.inverse_rms(x, eps).reshape(x.shape[:2] + (1,) * (out.ndim - 2))
    return (out.astype(jnp.float32) * inverse).astype(x.dtype)


def _qkv_projection(layer: Params, x: jax.Array, config: LlamaConfig,
                    fold_norm: bool = False) -> tuple[jax.Array, ...]:
    """Pre-norm and the q/k/v projections, before RoPE: x [B, T, hidden] -> (qkv [B, T, Hq + 2 * Hkv, D],) from
    the fused weight (query heads, then key heads, then value heads), else (q [B,T,Hq,D], k, v [B,T,Hkv,D])."""
    norm, eps = layer["attn_norm"], config.rms_norm_eps
    if "qkv_proj_t" in layer:
        qkv = _normed_projection("bth,nh->btn", x, norm, layer["qkv_proj_t"], 1, eps, fold_norm)
        return (qkv.reshape(*qkv.shape[:2], -1, config.head_dim),)
    return tuple(_normed_projection("bth,hnd->btnd", x, norm, layer[name], 0, eps, fold_norm)
                 for name in ("q_proj", "k_proj", "v_proj"))


def _attention_block(layer: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, config: LlamaConfig,
                     fold_norm: bool = False):
    """Pre-norm and the q/k/v projections with RoPE. x: [B, T, hidden] -> q [B,T,Hq,D], k, v [B,T,Hkv,D]."""
    heads = _qkv_projection(layer, x, config, fold_norm)
    if len(heads) == 1:
        q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        heads = jnp.split(heads[0], [q_heads, q_heads + kv_heads], axis=2)
    q, k, v = heads
    return nn.apply_rope(q, cos, sin), nn.apply_rope(k, cos, sin), v


def _mlp_block(layer: Params, x: jax.Array, config: LlamaConfig, fold_norm: bool = False) -> jax.Array:
    norm, eps = layer["mlp_norm"], config.rms_norm_eps
    if "gate_up_proj_t" in layer:
        gate, up = jnp.split(_normed_projection("bth,mh->btm", x, norm, layer["gate_up_proj_t"], 1, eps, fold_norm),
                             2, axis=-1)
        out = jnp.einsum("btm,hm->bth", nn.swiglu(gate, up), layer["down_proj_t"])
    else:
        gate, up = (_normed_projection("bth,hm->btm", x, norm, layer[name], 0, eps, fold_norm)
                    for name in ("gate_proj", "up_proj"))
        out = nn.swiglu(gate, up) @ layer["down_proj"]
    return checkpoint_name(out, "mlp_out")


def _output_projection(layer: Params, attn_out: jax.Array) -> jax.Array:
    attn_out = checkpoint_name(attn_out, "attn_out")
    if "o_proj_t" in layer:
        return jnp.einsum("btn,hn->bth", attn_out.reshape(*attn_out.shape[:2], -1), layer["o_proj_t"])
    # One [heads * head_dim, hidden] matmul: given the 4-D einsum, XLA:CPU transposed the weight to the attention
    # output's layout, a copy of all of o_proj on every decode step.
    o_proj = layer["o_proj"]
    return attn_out.reshape(*attn_out.shape[:2], -1) @ o_proj.reshape(-1, o_proj.shape[-1])


def decoder_stack(params: Params, x: jax.Array, config: LlamaConfig, *, positions: jax.Array,
                  segments: jax.Array, cache: KVCache | None = None, attn_impl: Implementation = "auto",
                  remat: str = "none", unroll: bool = False, segment_mask: bool = True,
                  pad_counts: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs all decoder layers: a `lax.scan` over the stacked layers, or with `unroll` a Python loop.

    x: [B, T, hidden] input embeddings; positions, segments: [B, T] (segment 0 = padding).
    Without a cache the T tokens attend to each other. With a cache they are written at slot `cache.end` and attend
    to everything the cache holds; the returned cache has `end` advanced by T.
    `pad_counts` [B] (one prompt per row into an empty cache only; see `generation.prefill`): x holds each row's
    real tokens first and its `pad_counts[b]` pads last; positions/segments describe the cache slots, left-padded
    as always. Token t of row b is written at slot t + pad_counts[b], and the tokens attend to each other with
    plain causal attention (exact, since every pad comes after the real tokens): the kind of call cuDNN's causal
    kernel and the flash kernels run fastest, with no cache slots to scan. Hidden states come back in x's order.
    `unroll` gives one straight-line program (longer compile; faster small decode steps on accelerators). Layers
    given as a list (`unstack_layers`) always run unrolled. `segment_mask=False` (no cache only) drops the segment
    mask for plain causal attention: exact for unpacked rows padded at the end (see `smoljax.attention`).
    Returns (hidden states [B, T, hidden] before the final norm, updated cache or None).
    """
    self_attending = pad_counts is not None
    if self_attending and cache is None:
        raise ValueError("pad_counts is for a prompt written into an empty cache; pass the cache")
    # Rows moved real-tokens-first hold one prompt each, so a token's index is its position.
    rope_positions = (jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
                      if self_attending else positions)
    cos, sin = nn.rope_cos_sin(rope_positions, config.head_dim, config.rope_theta, x.dtype)
    view = None
    if cache is not None:
        cache = write_metadata(cache, positions, segments)
        kv_positions, kv_segments = cache.positions, cache.segments
        view = cache_view(cache, x.shape[1])
    else:
        kv_positions, kv_segments = positions, segments
    q_segments = segments
    if not segment_mask:
        if cache is not None:
            raise ValueError("segment_mask=False is for whole-sequence forward passes, not the KV cache")
        q_segments = kv_segments = None
    if self_attending:
        q_segments = kv_segments = view = None
        kv_positions = rope_positions

    fold_norm = cache is not None and x.shape[1] > 1 and x.shape[0] * x.shape[1] >= FOLD_NORM_MIN_TOKENS
    # A decode step on per-layer cache buffers through the Pallas kernel folds RoPE and the cache write into the
    # attention kernel (`attention.decode_appending`); the stacked buffers of a layer scan take the plain path.
    appending = (view is not None and x.shape[1] == 1
                 and appends_in_kernel(attn_impl, x.dtype, cache.dtype, cache.max_length))

    def layer_step(carry, layer_and_index):
        x, k_cache, v_cache = carry
        layer, index = layer_and_index
        prompt_kv = None
        if appending and index is None:
            qkv = jnp.concatenate(_qkv_projection(layer, x, config), axis=2)[:, 0]
            attn_out, k_cache, v_cache = decode_appending(qkv, cos[:, 0], sin[:, 0], k_cache, v_cache, kv_segments,
                                                          view, q_heads=config.num_attention_heads)
            attn_out = attn_out[:, None]
        else:
            q, k, v = _attention_block(layer, x, cos, sin, config, fold_norm)
            if self_attending:
                # The prompt attends over its own rows; they go to the cache after the last layer.
                prompt_kv = (k, v)
            elif k_cache is not None:
                # Write this layer's new rows in place, then attend over the layer's whole cache buffer.
                k_cache, k = _append_rows(k_cache, k, index, cache.end)
                v_cache, v = _append_rows(v_cache, v, index, cache.end)
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            attn_out = attention(q, k, v, q_segments=q_segments, kv_segments=kv_segments, q_positions=rope_positions,
                                 kv_positions=kv_positions, causal=True, implementation=attn_impl, cache=view)
        x = x + _output_projection(layer, attn_out)
        x = x + _mlp_block(layer, x, config, fold_norm)
        return (x, k_cache, v_cache), prompt_kv

    if remat != "none":
        layer_step = jax.checkpoint(layer_step, policy=_remat_policy(remat), prevent_cse=False)
    # The layers carry the cache buffers, except in a prompt's self-attention, which only emits its K/V rows.
    carries_cache = cache is not None and not self_attending
    unstacked = isinstance(params["layers"], (list, tuple))
    if unroll or unstacked:
        # A Python loop: each layer gets its own weights (static slices of the stacked ones, unless already
        # unstacked) and its own cache buffer.
        k_layers = _as_layer_tuple(cache.k) if carries_cache else None
        v_layers = _as_layer_tuple(cache.v) if carries_cache else None
        new_k, new_v, prompt_k, prompt_v = [], [], [], []
        for index in range(config.num_hidden_layers):
            layer = (params["layers"][index] if unstacked
                     else jax.tree.map(lambda stacked: stacked[index], params["layers"]))
            layer_kv = (k_layers[index], v_layers[index]) if carries_cache else (None, None)
            (x, k_layer, v_layer), rows = layer_step((x, *layer_kv), (layer, None))
            new_k.append(k_layer)
            new_v.append(v_layer)
            if self_attending:
                prompt_k.append(rows[0])
                prompt_v.append(rows[1])
        k_all, v_all = tuple(new_k), tuple(new_v)
        if carries_cache and not isinstance(cache.k, tuple):
            k_all, v_all = jnp.stack(k_all), jnp.stack(v_all)
    else:
        carry = (x, _as_stacked(cache.k) if carries_cache else None,
                 _as_stacked(cache.v) if carries_cache else None)
        layer_indices = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
        (x, k_all, v_all), prompt_rows = jax.lax.scan(layer_step, carry, (params["layers"], layer_indices))
        if carries_cache and isinstance(cache.k, tuple):
            k_all, v_all = _as_layer_tuple(k_all), _as_layer_tuple(v_all)
        if self_attending:
            prompt_k, prompt_v = prompt_rows
    if self_attending:
        # Each row's K/V go behind its padding, as the general path leaves them.
        k_all = _store_prompt_rows(cache.k, prompt_k, pad_counts, cache.end)
        v_all = _store_prompt_rows(cache.v, prompt_v, pad_counts, cache.end)
    if cache is not None:
        cache = cache._replace(k=k_all, v=v_all, end=cache.end + x.shape[1])
    return x, cache


def shift_rows(rows: jax.Array, shifts: jax.Array) -> jax.Array:
    """Rotates each row along axis 1: out[b, t] = rows[b, (t - shifts[b]) mod T]. rows: [B, T, ...]; shifts: [B].
    A positive shift moves a row's tokens later (towards left padding), a negative one earlier."""
    length = rows.shape[1]
    source = (jnp.arange(length, dtype=jnp.int32)[None, :] - shifts[:, None].astype(jnp.int32)) % length
    source = source.reshape(source.shape + (1,) * (rows.ndim - 2))
    return jnp.take_along_axis(rows, source, axis=1)


def cache_view(cache: KVCache, new_tokens: int) -> CacheView:
    """Where `new_tokens` tokens written at slot `cache.end` sit, for the attention kernels: computed once per
    forward pass, not per layer. A row's live slots start at its first non-empty one (after its left padding)."""
    batch = cache.segments.shape[0]
    first_live = jnp.argmax(cache.segments != 0, axis=1).astype(jnp.int32)
    end = jnp.broadcast_to(cache.end + new_tokens, (batch,)).astype(jnp.int32)
    return CacheView(q_offset=cache.end, kv_start=first_live, kv_end=end)


def _append_rows(buffer: jax.Array, rows: jax.Array, layer_index: jax.Array | None,
                 start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes new K or V rows [B, T, Hkv, D] at slot `start` of one layer's buffer [B, S, Hkv, D] (layer_index
    None) or of the stacked buffer [L, B, S, Hkv, D]. Returns (updated buffer, the layer's rows [B, S, Hkv, D])."""
    if layer_index is None:
        buffer = jax.lax.dynamic_update_slice(buffer, rows.astype(buffer.dtype), (0, start, 0, 0))
        return buffer, buffer
    buffer = jax.lax.dynamic_update_slice(buffer, rows[None].astype(buffer.dtype), (layer_index, 0, start, 0, 0))
    return buffer, buffer[layer_index]


def _store_prompt_rows(buffer: jax.Array | tuple[jax.Array, ...], rows: jax.Array | list[jax.Array],
                       pad_counts: jax.Array, start: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
    """Writes a prompt's K or V rows, real tokens first (stacked [L, B, T, Hkv, D] or a list of [B, T, Hkv, D]), at
    slot `start` of the cache buffer (stacked or per-layer), each row moved behind its `pad_counts` [B] pads."""
    if isinstance(buffer, tuple):
        return tuple(jax.lax.dynamic_update_slice(layer_buffer, shift_rows(layer_rows, pad_counts).astype(
            layer_buffer.dtype), (0, start, 0, 0)) for layer_buffer, layer_rows in zip(buffer, rows))
    rows = jnp.stack(rows) if isinstance(rows, list) else rows
    shifted = jax.vmap(shift_rows, in_axes=(0, None))(rows, pad_counts)
    return jax.lax.dynamic_update_slice(buffer, shifted.astype(buffer.dtype), (0, 0, start, 0, 0))


def _as_layer_tuple(buffer: jax.Array | tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return buffer if isinstance(buffer, tuple) else tuple(buffer)


def _as_stacked(buffer: jax.Array | tuple[jax.Array, ...]) -> jax.Array:
    return jnp.stack(buffer) if isinstance(buffer, tuple) else buffer


def fused_decode_forward(params: Params, tokens: jax.Array, cache: KVCache, config: LlamaConfig, *,
                         positions: jax.Array) -> tuple[jax.Array, KVCache]:
    """One decode step of a single row through the fused layer kernels (`smoljax.kernels.decode_layer`).

    tokens, positions: [1, 1]; params in the serving layout (`fuse_projections`) with unstacked layers
    (`unstack_layers`); cache with per-layer buffers. Returns f32 logits [1, 1, vocab] and the updated cache.
    On a backend other than GPU the kernels run in the Pallas interpreter (for tests).
    """
    from smoljax.kernels.decode_layer import decode_layer

    interpret = jax.default_backend() != "gpu"
    x = embed(params, tokens)
    cache = write_metadata(cache, positions, jnp.ones_like(tokens))
    view = cache_view(cache, 1)
    cos, sin = nn.rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    hidden = x[0, 0]
    new_k, new_v = [], []
    for layer, k_buffer, v_buffer in zip(params["layers"], cache.k, cache.v):
        hidden, k_buffer, v_buffer = decode_layer(layer, hidden, cos[0, 0], sin[0, 0], k_buffer[0], v_buffer[0],
                                                  cache.segments[0], view.kv_start[0], cache.end, config,
                                                  interpret=interpret)
        new_k.append(k_buffer[None])
        new_v.append(v_buffer[None])
    cache = cache._replace(k=tuple(new_k), v=tuple(new_v), end=cache.end + 1)
    return lm_logits(params, hidden[None, None], config), cache


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
