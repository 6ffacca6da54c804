"""Next-token cross-entropy with the LM head computed in chunks, so f32 logits [B, T, vocab] never exist whole.

A batch carries its targets already shifted (see `smoljax.training.data`):

    tokens      int32   [B, T]  model inputs
    targets     int32   [B, T]  the token each position must predict
    loss_mask   float32 [B, T]  1 where that prediction is trained (0: padding, prompt turns, document ends)
    segment_ids int32   [B, T]  packed documents 1, 2, ...; 0 is padding (attention never crosses segments)
    positions   int32   [B, T]  position within each document
    (SmolVLM2 adds pixel_values [N, C, H, W] and pixel_mask [N, H, W]: the batch's tiles in prompt order.)

HF-style labels (the input ids with -100 where ignored) convert with `targets_from_labels`.

The losses come back as sums with the token count, so gradient accumulation and data-parallel shards can add them
up and divide once: the mean over the whole global batch, exactly as one big batch would give.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from smoljax import nn
from smoljax.config import LlamaConfig, VLMConfig
from smoljax.models import smollm2, smolvlm2

IGNORE_INDEX = -100


class LossSums(NamedTuple):
    """Summed over the trained tokens of a batch: cross-entropy, z-loss (log Z squared) and the token count."""

    cross_entropy: jax.Array
    z_loss: jax.Array
    tokens: jax.Array


def targets_from_labels(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF labels [B, T] (a copy of the inputs, IGNORE_INDEX where ignored) -> (targets, loss_mask), both [B, T].

    Position t predicts labels[t + 1]; the last position predicts nothing.
    """
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    loss_mask = (shifted != IGNORE_INDEX).astype(jnp.float32)
    return jnp.where(shifted == IGNORE_INDEX, 0, shifted).astype(jnp.int32), loss_mask


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                          head_is_embedding: bool, chunk_size: int = 2048) -> LossSums:
    """Cross-entropy of the LM head over `chunk_size` tokens at a time.

    hidden: [B, T, H] final-normed hidden states; head: the embedding [V, H] (tied) or lm_head [H, V];
    targets, loss_mask: [B, T]. Each chunk's logits [chunk, V] are recomputed in the backward pass, so peak memory
    holds one chunk of logits instead of all of them (see `_chunk_sums`).
    """
    width = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, width)
    flat_targets = targets.reshape(-1).astype(jnp.int32)
    flat_mask = loss_mask.reshape(-1).astype(jnp.float32)
    count = flat_hidden.shape[0]
    chunk_size = min(chunk_size, count)
    padding = -count % chunk_size
    if padding:  # masked tail rows: they add nothing to the sums
        flat_hidden = jnp.pad(flat_hidden, ((0, padding), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, padding))
        flat_mask = jnp.pad(flat_mask, (0, padding))
    chunks = (flat_hidden.reshape(-1, chunk_size, width), flat_targets.reshape(-1, chunk_size),
              flat_mask.reshape(-1, chunk_size))
    def body(totals, chunk):
        ce, z = _chunk_sums(chunk[0], head, chunk[1], chunk[2], head_is_embedding)
        return (totals[0] + ce, totals[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), chunks)
    return LossSums(ce_sum, z_sum, jnp.sum(flat_mask))


def lm_loss_sums(params: dict[str, Any], batch: dict[str, jax.Array], config: LlamaConfig | VLMConfig, *,
                 remat: str = "none", attn_impl: str = "auto", chunk_size: int = 2048,
                 segment_mask: bool = True, unroll: bool = False) -> LossSums:
    """The loss sums of a SmolLM2 or SmolVLM2 batch (see the module docstring for its arrays).

    segment_mask=False: causal attention only, for batches of unpacked rows (one document each, padding at the end),
    where it is exact and lets cuDNN run its causal kernel. unroll: the layers as straight-line code instead of a
    scan (no stacking of per-layer residuals; longer compile).
    The parameters are used in whatever dtype they come in (cast them for mixed precision before calling).
    """
    is_vlm = isinstance(config, VLMConfig)
    text_params = params["text"] if is_vlm else params
    text_config = config.text if is_vlm else config
    if is_vlm:
        embeds = smolvlm2.embed_inputs(params, batch["tokens"], batch.get("pixel_values"), batch.get("pixel_mask"),
                                       config, attn_impl)
    else:
        embeds = smollm2.embed(text_params, batch["tokens"])
    hidden, _ = smollm2.decoder_stack(text_params, embeds, text_config, positions=batch["positions"],
                                      segments=batch["segment_ids"], attn_impl=attn_impl, remat=remat,
                                      segment_mask=segment_mask, unroll=unroll)
    normed = nn.rms_norm(hidden, text_params["final_norm"], text_config.rms_norm_eps)
    tied = "lm_head" not in text_params
    head = text_params["embed"] if tied else text_params["lm_head"]
    return chunked_cross_entropy(normed, head, batch["targets"], batch["loss_mask"], head_is_embedding=tied,
                                 chunk_size=chunk_size)


def mean_loss(sums: LossSums, z_loss_weight: float = 0.0) -> jax.Array:
    """The objective: mean cross-entropy plus `z_loss_weight` times the mean log Z squared (PaLM's z-loss)."""
    tokens = jnp.maximum(sums.tokens, 1.0)
    return (sums.cross_entropy + z_loss_weight * sums.z_loss) / tokens


def _head_logits(hidden: jax.Array, head: jax.Array, head_is_embedding: bool) -> jax.Array:
    """[C, H] x head -> logits [C, V] in the compute dtype (bf16 under mixed precision, as autocast gives),
    accumulated in f32 by the matmul; the softmax statistics are then taken in f32."""
    equation = "ch,vh->cv" if head_is_embedding else "ch,hv->cv"
    return jnp.einsum(equation, hidden, head, preferred_element_type=hidden.dtype)


def _chunk_forward(hidden, head, targets, mask, head_is_embedding):
    logits = _head_logits(hidden, head, head_is_embedding).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask)), log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                head_is_embedding: bool) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy sum, log Z^2 sum) of one chunk: hidden [C, H], targets and mask [C].

    A custom gradient, for speed. The backward pass recomputes the logits (one matmul) but keeps log Z [C] from
    the forward, so the [C, V] logits are neither stored nor reduced twice. And the gradient of the logits goes
    back through the head in the compute dtype with f32 accumulation, as autocast does: left to autodiff, the f32
    cotangent would promote both backward [C, V] x [V, H] matmuls to f32, several times slower.
    """
    return _chunk_forward(hidden, head, targets, mask, head_is_embedding)[0]


def _chunk_sums_fwd(hidden, head, targets, mask, head_is_embedding):
    sums, log_z = _chunk_forward(hidden, head, targets, mask, head_is_embedding)
    return sums, (hidden, head, targets, mask, log_z)


def _chunk_sums_bwd(head_is_embedding, residuals, cotangents):
    hidden, head, targets, mask, log_z = residuals
    d_ce, d_z = cotangents
    logits = _head_logits(hidden, head, head_is_embedding).astype(jnp.float32)
    probs = jnp.exp(logits - log_z[:, None])
    # d(log Z - logit[target]) = softmax - onehot(target); d(log Z^2) = 2 log Z softmax.
    is_target = jnp.arange(logits.shape[-1])[None, :] == targets[:, None]
    d_logits = (probs * (d_ce + 2 * d_z * log_z)[:, None] - jnp.where(is_target, d_ce, 0.0)) * mask[:, None]
    d_logits = d_logits.astype(head.dtype)
    if head_is_embedding:  # head [V, H]
        d_hidden = jnp.einsum("cv,vh->ch", d_logits, head, preferred_element_type=jnp.float32)
        d_head = jnp.einsum("cv,ch->vh", d_logits, hidden, preferred_element_type=jnp.float32)
    else:  # head [H, V]
        d_hidden = jnp.einsum("cv,hv->ch", d_logits, head, preferred_element_type=jnp.float32)
        d_head = jnp.einsum("ch,cv->hv", hidden, d_logits, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_head.astype(head.dtype), None, None


_chunk_sums.defvjp(_chunk_sums_fwd, _chunk_sums_bwd)
