"""SmolVLM2: the connector (pixel shuffle + projection) and the merge of image features into the text sequence.

The whole model is the SmolLM2 decoder run over merged embeddings: each image tile becomes `image_seq_len` feature
vectors that overwrite, in order, the embeddings of the `<image>` placeholder tokens. There is no cross-attention.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from smoljax.attention import Implementation
from smoljax.config import VLMConfig
from smoljax.errors import InputError
from smoljax.models import siglip, smollm2

Params = dict[str, Any]


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
    """Space-to-depth on a square patch grid: [N, S, D] -> [N, S / scale^2, D * scale^2].

    The reshapes and transposes follow HF's SmolVLMConnector step for step, so the features land in the same order
    the projection weights expect.
    """
    n, seq, dim = x.shape
    side = int(round(seq ** 0.5))
    x = x.reshape(n, side, side // scale, dim * scale)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(n, side // scale, side // scale, dim * scale * scale)
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(n, seq // scale ** 2, dim * scale ** 2)


def connector(params: Params, image_hidden: jax.Array, config: VLMConfig) -> jax.Array:
    """Vision hidden states [N, patches, D_vision] -> image features [N, image_seq_len, D_text]."""
    return pixel_shuffle(image_hidden, config.scale_factor) @ params["proj"]


def image_features(params: Params, pixel_values: jax.Array, pixel_mask: jax.Array, config: VLMConfig,
                   attn_impl: Implementation = "auto") -> jax.Array:
    """Tiles [N, C, H, W] and pixel masks [N, H, W] -> features [N, image_seq_len, D_text] (encoder + connector)."""
    hidden = siglip.encode_images(params["vision"], pixel_values, pixel_mask, config.vision, attn_impl)
    return connector(params["connector"], hidden, config)


def merge_image_features(text_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token_id: int) -> jax.Array:
    """Overwrites the `<image>` positions of text_embeds [B, T, D] with feature rows [F, D], in row-major order.

    The k-th placeholder (counting across the batch) takes feature row k. Callers check that the counts agree
    (`check_image_token_count`); under jit a surplus placeholder would repeat the last row.
    """
    is_image = (input_ids == image_token_id).reshape(-1)
    feature_index = jnp.clip(jnp.cumsum(is_image) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features.astype(text_embeds.dtype), feature_index, axis=0)
    merged = jnp.where(is_image[:, None], gathered, text_embeds.reshape(-1, text_embeds.shape[-1]))
    return merged.reshape(text_embeds.shape)


def check_image_token_count(input_ids: Any, num_tiles: int, config: VLMConfig) -> None:
    """Raises InputError unless the prompts hold exactly one `<image>` placeholder per image feature."""
    placeholders = int(np.sum(np.asarray(input_ids) == config.image_token_id))
    features = num_tiles * config.image_seq_len
    if placeholders != features:
        raise InputError(
            f"the prompts hold {placeholders} <image> tokens but the images give {features} features "
            f"({num_tiles} tiles x {config.image_seq_len}); build prompts with smoljax.processor.VLMProcessor so "
            "each image is expanded to its tiles")


def embed_inputs(params: Params, input_ids: jax.Array, pixel_values: jax.Array | None,
                 pixel_mask: jax.Array | None, config: VLMConfig, attn_impl: Implementation = "auto") -> jax.Array:
    """Text embeddings [B, T, D] with the image features merged in. input_ids: [B, T]; pixel_values: [N, C, H, W]
    (the real tiles of all prompts, in prompt order) and pixel_mask [N, H, W], or None for text only."""
    embeds = smollm2.embed(params["text"], input_ids)
    if pixel_values is None:
        return embeds
    features = image_features(params, pixel_values, pixel_mask, config, attn_impl)
    return merge_image_features(embeds, input_ids, features.reshape(-1, features.shape[-1]),
                                config.image_token_id)


def forward(params: Params, input_ids: jax.Array, config: VLMConfig, *, pixel_values: jax.Array | None = None,
            pixel_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, attn_impl: Implementation = "auto", remat: str = "none",
            ) -> jax.Array:
    """Logits [B, T, vocab] (f32) of prompts with images. input_ids: [B, T]; pixel_values [N, C, H, W] and
    pixel_mask [N, H, W] hold the N real tiles of the batch in prompt order (see `flatten_images`)."""
    text_config = config.text
    smollm2.check_token_ids(input_ids, text_config.vocab_size)
    if pixel_values is not None and not isinstance(input_ids, jax.core.Tracer):
        check_image_token_count(input_ids, pixel_values.shape[0], config)
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = smollm2.segment_positions(segment_ids)
    embeds = embed_inputs(params, input_ids, pixel_values, pixel_mask, config, attn_impl)
    hidden, _ = smollm2.decoder_stack(params["text"], embeds, text_config, positions=positions,
                                      segments=segment_ids, attn_impl=attn_impl, remat=remat)
    return smollm2.lm_logits(params["text"], hidden, text_config)


def flatten_images(pixel_values: np.ndarray, pixel_mask: np.ndarray,
                   tiles_per_prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The processor's padded batch [B, N_max, C, H, W] / [B, N_max, H, W] -> the real tiles [N, C, H, W] /
    [N, H, W] in prompt order, dropping each prompt's padding slots."""
    values = [pixel_values[b, :count] for b, count in enumerate(tiles_per_prompt)]
    masks = [pixel_mask[b, :count] for b, count in enumerate(tiles_per_prompt)]
    return np.concatenate(values), np.concatenate(masks)


def tiles_per_image(rows: int, cols: int) -> int:
    """Tiles one image becomes: rows x cols crops plus the global image, or just the image when not split."""
    return rows * cols + 1 if rows > 0 else 1
