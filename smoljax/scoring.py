"""Scoring: log-probabilities of given tokens under the model."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smoljax.attention import Implementation
from smoljax.config import LlamaConfig, VLMConfig
from smoljax.generation import bucket_length
from smoljax.models import smollm2


@functools.partial(jax.jit, static_argnames=("config", "attn_impl"))
def sequence_logprobs(params: dict, tokens: jax.Array, segment_ids: jax.Array, config: LlamaConfig,
                      attn_impl: Implementation = "auto") -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1. tokens, segment_ids: [B, T] -> f32 [B, T - 1]."""
    logits = smollm2.forward(params, tokens, config, segment_ids=segment_ids, attn_impl=attn_impl)
    return _next_token_logprobs(logits[:, :-1], tokens)


def _next_token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t + 1]) from the logits [B, T - 1, V] at positions 0..T-2. tokens: [B, T] -> [B, T - 1]."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def token_logprobs(params: dict, config: LlamaConfig, tokens: Sequence[int]) -> np.ndarray:
    """Log-probabilities [len(tokens) - 1] of tokens[1:], each given the tokens before it.

    The sequence is right-padded to a bucketed length so texts of similar length share one compilation: powers of
    two up to 512, then multiples of 512, which bounds the padding waste for long texts.
    """
    smollm2.check_token_ids(tokens, config.vocab_size)
    length = bucket_length(len(tokens)) if len(tokens) <= 512 else -(-len(tokens) // 512) * 512
    length = min(length, max(len(tokens), config.max_position_embeddings))
    padded = np.zeros((1, length), np.int32)
    segments = np.zeros((1, length), np.int32)
    padded[0, :len(tokens)] = tokens
    segments[0, :len(tokens)] = 1
    out = sequence_logprobs(params, jnp.asarray(padded), jnp.asarray(segments), config)
    return np.asarray(out[0, :len(tokens) - 1])


@functools.partial(jax.jit, static_argnames=("config", "attn_impl"))
def _vlm_sequence_logprobs(params: dict, tokens: jax.Array, embeds: jax.Array, config: LlamaConfig,
                           attn_impl: Implementation = "auto") -> jax.Array:
    """Like `sequence_logprobs`, over given input embeddings [1, T, hidden] (text tower params and config)."""
    segments = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = smollm2.decoder_stack(params, embeds, config, positions=smollm2.segment_positions(segments),
                                      segments=segments, attn_impl=attn_impl)
    return _next_token_logprobs(smollm2.lm_logits(params, hidden[:, :-1], config), tokens)


def vlm_token_logprobs(params: dict, config: VLMConfig, tokens: Sequence[int], pixel_values: np.ndarray,
                       pixel_attention_mask: np.ndarray) -> np.ndarray:
    """Log-probabilities [len(tokens) - 1] of a SmolVLM2 prompt's tokens[1:] (ids after image expansion), with the
    image features in place of the `<image>` placeholders. pixel_values: the processor's [1, N, 3, H, W]."""
    from smoljax.generation import prompt_embeddings

    smollm2.check_token_ids(tokens, config.text.vocab_size)
    ids = np.asarray([tokens], np.int32)
    embeds = prompt_embeddings(params, config, ids, pixel_values, pixel_attention_mask)
    out = _vlm_sequence_logprobs(params["text"], jnp.asarray(ids), embeds, config.text)
    return np.asarray(out[0])
