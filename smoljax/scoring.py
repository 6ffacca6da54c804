"""Scoring: log-probabilities of given tokens under the model."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smoljax.attention import Implementation
from smoljax.config import LlamaConfig
from smoljax.generation import bucket_length
from smoljax.models import smollm2


@functools.partial(jax.jit, static_argnames=("config", "attn_impl"))
def sequence_logprobs(params: dict, tokens: jax.Array, segment_ids: jax.Array, config: LlamaConfig,
                      attn_impl: Implementation = "auto") -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1. tokens, segment_ids: [B, T] -> f32 [B, T - 1]."""
    logits = smollm2.forward(params, tokens, config, segment_ids=segment_ids, attn_impl=attn_impl)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
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
