"""Attention: one dispatch function over interchangeable implementations.

Masks are described by structure, not by a dense matrix, so fused kernels can use them:

- `segment ids` [B, T] int: tokens attend only within the same segment; segment 0 marks padding (or an empty cache
  slot) and is never attended to. Packed sequences use 1, 2, 3, ...; a plain batch uses 1 for real tokens.
- `positions` [B, T] int: with `causal=True`, a query at position p sees keys at positions <= p.
- no segment ids (None): one document per row, padding (if any) only at the end, causal masking only. Exact for the
  real tokens of unpacked rows, and what lets cuDNN use its causal kernel instead of reading a dense mask.

Query heads are grouped over key/value heads (GQA) by reshaping the queries, so K and V are never repeated.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]  # auto: cudnn on GPU in bf16/f16, else xla
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array, causal: bool) -> jax.Array:
    """Boolean mask [B, Tq, Tk]: True where a query may attend to a key."""
    same_segment = q_segments[:, :, None] == kv_segments[:, None, :]
    allowed = same_segment & (kv_segments[:, None, :] != 0)
    if causal:
        allowed &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return allowed


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention in plain XLA ops.

    q: [B, Tq, q_heads, D], k/v: [B, Tk, kv_heads, D], mask: [B, Tq, Tk] bool -> [B, Tq, q_heads, D].
    Scores and softmax run in f32; a query with no visible key (padding) returns zeros rather than NaN.
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped_q = q.reshape(batch, q_len, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", grouped_q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    visible = mask[:, None, None, :, :]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """cuDNN fused attention through `jax.nn.dot_product_attention` (GPU only; handles GQA natively).
    mask None: plain causal attention with cuDNN's own causal kernel (no mask read from memory)."""
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="cudnn")
    # cuDNN leaves fully masked rows undefined; padding queries must read as zeros like the reference.
    any_visible = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(any_visible, out, jnp.zeros_like(out))


def resolve_implementation(implementation: Implementation, dtype=None) -> str:
    """Turns 'auto' into the implementation to use on the default backend: cuDNN's fused attention on a GPU for
    bf16/f16 inputs (it never writes the [Tq, Tk] scores to memory, which the vision encoder's 1024-patch tiles
    otherwise do), the XLA reference everywhere else."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"
    return implementation


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segments: jax.Array | None,
              kv_segments: jax.Array | None, q_positions: jax.Array, kv_positions: jax.Array, causal: bool = True,
              implementation: Implementation = "auto") -> jax.Array:
    """Dot-product attention with segment and causal masking.

    q: [B, Tq, q_heads, D]; k, v: [B, Tk, kv_heads, D]; segments/positions: [B, Tq] and [B, Tk].
    Segments None (both): causal masking only, queries and keys aligned (self-attention over a whole row).
    Returns [B, Tq, q_heads, D].
    """
    impl = resolve_implementation(implementation, q.dtype)
    if q_segments is None:
        if not causal or q.shape[1] != k.shape[1]:
            raise ValueError("attention without segment ids is causal self-attention over whole rows only")
        if impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
            return cudnn_attention(q, k, v, None)
        ones = jnp.ones(q.shape[:2], jnp.int32)
        return xla_attention(q, k, v, attention_mask(ones, ones, q_positions, kv_positions, causal))
    mask = attention_mask(q_segments, kv_segments, q_positions, kv_positions, causal)
    if impl == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got {q.dtype}; use 'xla' for f32")
        return cudnn_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask)
