"""SmolVLM2's SigLIP vision encoder as pure functions: patches -> embeddings -> scan(pre-LN blocks) -> LayerNorm.

Images arrive as fixed-size tiles with a pixel mask (the image processor pads a small image inside its tile). The
mask decides which patches are real: padding patches are never attended to as keys, and real patches get learned
position embeddings bucketized to the image's own patch grid, as HF's NaViT-style embedding does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from smoljax import nn
from smoljax.attention import Implementation, attention
from smoljax.config import VisionConfig

Params = dict[str, Any]


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """[N, C, H, W] -> [N, (H // P) * (W // P), C * P * P], patches row-major, each flattened (channel, row, col)
    like the conv weight it multiplies. A remainder of H or W beyond whole patches is dropped, as the conv does."""
    n, channels, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixel_values[:, :, :rows * patch_size, :cols * patch_size]
    x = x.reshape(n, channels, rows, patch_size, cols, patch_size)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, rows * cols, channels * patch_size * patch_size)


def patch_mask(pixel_mask: jax.Array, patch_size: int) -> jax.Array:
    """[N, H, W] bool pixel mask -> [N, H // P, W // P] bool: a patch is real when any of its pixels is."""
    n, height, width = pixel_mask.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixel_mask[:, :rows * patch_size, :cols * patch_size].reshape(n, rows, patch_size, cols, patch_size)
    return jnp.any(x, axis=(2, 4))


def _bucket_boundaries(patches_per_side: int) -> np.ndarray:
    """HF's `torch.arange(1 / n, 1.0, 1 / n)` in f32: element count and values computed in f64, then rounded."""
    step = 1.0 / patches_per_side
    count = math.ceil((1.0 - step) / step)
    return (step + np.arange(count, dtype=np.float64) * step).astype(np.float32)


def position_ids(mask: jax.Array, patches_per_side: int) -> jax.Array:
    """Position-embedding ids [N, h * w] for patch masks [N, h, w].

    A real image covering nb_h x nb_w patches has its patch coordinates scaled into [0, 1) and bucketized onto the
    full n x n grid of learned positions, so a small image still spans the whole position table. Padding patches
    get id 0. The f32 arithmetic follows HF's so ids agree exactly.
    """
    n, rows, cols = mask.shape
    boundaries = jnp.asarray(_bucket_boundaries(patches_per_side))
    nb_rows = jnp.maximum(jnp.sum(mask[:, :, 0], axis=1), 1).astype(jnp.float32)
    nb_cols = jnp.maximum(jnp.sum(mask[:, 0, :], axis=1), 1).astype(jnp.float32)

    def buckets(length: int, nb: jax.Array) -> jax.Array:
        coords = jnp.arange(length, dtype=jnp.float32)[None, :] * (1.0 / nb)[:, None]
        coords = jnp.minimum(coords, jnp.float32(1.0 - 1e-6))
        return jnp.searchsorted(boundaries, coords, side="right").astype(jnp.int32)

    ids = buckets(rows, nb_rows)[:, :, None] * patches_per_side + buckets(cols, nb_cols)[:, None, :]
    return jnp.where(mask, ids, 0).reshape(n, rows * cols)


def embed_patches(params: Params, pixel_values: jax.Array, pixel_mask: jax.Array,
                  config: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """Tiles [N, C, H, W] and pixel masks [N, H, W] -> patch embeddings [N, h * w, hidden] and patch mask [N, h * w]."""
    dtype = params["patch_embed"].dtype
    patches = patchify(pixel_values.astype(dtype), config.patch_size)
    embeddings = patches @ params["patch_embed"] + params["patch_bias"]
    mask = patch_mask(pixel_mask, config.patch_size)
    positions = position_ids(mask, config.patches_per_side)
    embeddings = embeddings + jnp.take(params["position_embed"], positions, axis=0)
    return embeddings, mask.reshape(mask.shape[0], -1)


def encoder_layer(layer: Params, x: jax.Array, key_segments: jax.Array, config: VisionConfig,
                  attn_impl: Implementation = "auto") -> jax.Array:
    """One pre-LN block: x + attn(LN(x)), then + MLP(LN(.)). x: [N, T, hidden]; key_segments: [N, T] (0 = padding)."""
    normed = nn.layer_norm(x, layer["ln1_scale"], layer["ln1_bias"], config.layer_norm_eps)
    q = jnp.einsum("bth,hnd->btnd", normed, layer["q_proj"]) + layer["q_bias"]
    k = jnp.einsum("bth,hnd->btnd", normed, layer["k_proj"]) + layer["k_bias"]
    v = jnp.einsum("bth,hnd->btnd", normed, layer["v_proj"]) + layer["v_bias"]
    # Bidirectional: every patch, padding included, attends to the real patches only (HF masks keys, not queries;
    # padding patches still flow into the connector, so their outputs must match too).
    everyone = jnp.ones_like(key_segments)
    unused_positions = jnp.zeros_like(key_segments)
    attn_out = attention(q, k, v, q_segments=everyone, kv_segments=key_segments, q_positions=unused_positions,
                         kv_positions=unused_positions, causal=False, implementation=attn_impl)
    x = x + jnp.einsum("btnd,ndh->bth", attn_out, layer["o_proj"]) + layer["o_bias"]
    normed = nn.layer_norm(x, layer["ln2_scale"], layer["ln2_bias"], config.layer_norm_eps)
    hidden = nn.gelu_tanh(normed @ layer["fc1"] + layer["fc1_bias"])
    return x + hidden @ layer["fc2"] + layer["fc2_bias"]


def encode_images(params: Params, pixel_values: jax.Array, pixel_mask: jax.Array, config: VisionConfig,
                  attn_impl: Implementation = "auto") -> jax.Array:
    """The vision encoder: tiles [N, C, H, W] (normalized pixels) and pixel masks [N, H, W] bool ->
    last hidden states [N, patches, hidden] after the post-LayerNorm."""
    x, mask = embed_patches(params, pixel_values, pixel_mask, config)
    key_segments = mask.astype(jnp.int32)

    def step(x, layer):
        return encoder_layer(layer, x, key_segments, config, attn_impl), None

    x, _ = jax.lax.scan(step, x, params["layers"])
    return nn.layer_norm(x, params["post_norm_scale"], params["post_norm_bias"], config.layer_norm_eps)
