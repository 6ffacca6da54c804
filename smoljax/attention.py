"""Attention: one dispatch function over interchangeable implementations.

Masks are described by structure, not by a dense matrix, so fused kernels can use them:

- `segment ids` [B, T] int: tokens attend only within the same segment; segment 0 marks padding (or an empty cache
  slot) and is never attended to. Packed sequences use 1, 2, 3, ...; a plain batch uses 1 for real tokens.
- `positions` [B, T] int: with `causal=True`, a query at position p sees keys at positions <= p.
- no segment ids (None): one document per row, padding (if any) only at the end, causal masking only. Exact for the
  real tokens of unpacked rows, and what lets cuDNN use its causal kernel instead of reading a dense mask.

Query heads are grouped over key/value heads (GQA) by reshaping the queries, so K and V are never repeated.

Implementations: `xla` (the reference below, the one every kernel is tested against), `cudnn` (fused attention
through `jax.nn.dot_product_attention`, GPU only) and `pallas` (the kernels in `smoljax.kernels`: flash attention
with segment ids and a query offset, split-K decode attention over the KV cache; Triton on GPUs, Mosaic on TPUs).
`auto` picks one per backend, dtype and kind of call (`KINDS`, `GPU_AUTO`). Calls against a KV cache pass a
`CacheView`, which tells the kernels where the new queries sit and which slots are live.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn", "pallas"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")

# The kinds of attention the models run, which the dispatch tells apart because the fastest kernel differs:
#   causal         self-attention, one document per row (no segment ids): training on unpacked rows, scoring
#   packed         causal self-attention with segment ids: packed training rows, padded batches
#   bidirectional  the vision encoder: every query sees every real key
#   prefill        several new tokens against a KV cache (generation's prompt)
#   decode         one new token per row against a KV cache
KINDS = ("causal", "packed", "bidirectional", "prefill", "decode")

# What "auto" picks on a GPU for bf16/f16 inputs, by kind; BENCHMARKS.md ("Attention kernels") has the timings
# behind each entry. TPUs always get the Pallas kernels; CPUs (and f32 on GPUs) the XLA reference.
GPU_AUTO = {"causal": "cudnn", "packed": "pallas", "bidirectional": "pallas", "prefill": "pallas",
            "decode": "pallas"}


class CacheView(NamedTuple):
    """Where new queries sit in a KV cache whose slots are in token order (see `smoljax.cache`).

    q_offset: [] int, the slot of the first new token; kv_start, kv_end: [B] int, each row's live slots
    [start, end) once the new tokens are written (left padding before start, unwritten slots from end on).
    """

    q_offset: jax.Array
    kv_start: jax.Array
    kv_end: jax.Array


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


def attention_kind(q_len: int, causal: bool, segmented: bool, cache: CacheView | None) -> str:
    """Which of `KINDS` a call is."""
    if cache is not None:
        return "decode" if q_len == 1 else "prefill"
    if not causal:
        return "bidirectional"
    return "packed" if segmented else "causal"


def resolve_implementation(implementation: Implementation, dtype=None, kind: str = "packed") -> str:
    """Turns 'auto' into the implementation for the default backend: on a GPU in bf16/f16 the fastest kernel for
    `kind` (`GPU_AUTO`), on a TPU the Pallas kernels, elsewhere the XLA reference."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas"
    if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return GPU_AUTO[kind]
    return "xla"


def _interprets_pallas() -> bool:
    """Whether Pallas kernels run in the interpreter: on any backend without a Pallas compiler (CPUs)."""
    return jax.default_backend() not in ("gpu", "tpu")


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segments: jax.Array | None,
                     kv_segments: jax.Array | None, causal: bool, cache: CacheView | None) -> jax.Array | None:
    """The Pallas kernels: Triton on GPUs, Mosaic on TPUs, the Pallas interpreter elsewhere (slow; for tests).

    Shapes as in `attention`. Returns None where there is no kernel for the call: on TPUs, a prefill against a
    cache (queries offset into the keys), which `attention` then runs with the XLA reference.
    """
    backend = jax.default_backend()
    interpret = _interprets_pallas()
    if backend == "tpu":
        from smoljax.kernels import tpu_attention
        if cache is not None and q.shape[1] == 1:
            return tpu_attention.decode_attention_tpu(q[:, 0], k, v, kv_segments, cache.kv_start,
                                                      cache.kv_end)[:, None]
        if cache is None:
            return tpu_attention.flash_attention_tpu(q, k, v, q_segments=q_segments, kv_segments=kv_segments,
                                                     causal=causal)
        return None
    if cache is not None and q.shape[1] == 1:
        from smoljax.kernels.decode_attention import decode_attention
        return decode_attention(q[:, 0], k, v, kv_segments, cache.kv_start, cache.kv_end,
                                interpret=interpret)[:, None]
    from smoljax.kernels.flash_attention import flash_attention
    return flash_attention(q, k, v, q_segments=q_segments, kv_segments=kv_segments, causal=causal,
                           q_offset=0 if cache is None else cache.q_offset, interpret=interpret)


def appends_in_kernel(implementation: Implementation, dtype, cache_dtype, cache_length: int) -> bool:
    """Whether a decode step's attention runs through `decode_appending`: the Pallas decode path on a GPU (or the
    interpreter on a CPU; TPUs have their own decode kernel), on a cache of whole kernel blocks stored in the
    model's dtype (the kernel attends to the new key before it is stored, so it must not lose precision there)."""
    from smoljax.cache import CACHE_BLOCK

    return (resolve_implementation(implementation, dtype, "decode") == "pallas" and jax.default_backend() != "tpu"
            and cache_dtype == dtype and cache_length % CACHE_BLOCK == 0)


def decode_appending(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     kv_segments: jax.Array, cache: CacheView, *,
                     q_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's attention from its q/k/v heads before RoPE, with RoPE and the write of the new key and
    value folded into the Pallas kernel (`smoljax.kernels.decode_attention.append_and_attend`): three launches a
    layer fewer than RoPE, two cache updates and `attention`.

    qkv: [B, Hq + 2 * Hkv, D]; cos, sin: [B, D]; k_cache, v_cache: one layer's [B, S, Hkv, D]; kv_segments [B, S].
    Returns (output [B, Hq, D], k_cache, v_cache with the new token at slot `cache.q_offset`).
    """
    from smoljax.cache import CACHE_BLOCK
    from smoljax.kernels.decode_attention import append_and_attend

    return append_and_attend(qkv, cos, sin, k_cache, v_cache, kv_segments, cache.kv_start, cache.kv_end,
                             q_heads=q_heads, block_k=CACHE_BLOCK,
                             interpret=_interprets_pallas())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segments: jax.Array | None,
              kv_segments: jax.Array | None, q_positions: jax.Array, kv_positions: jax.Array, causal: bool = True,
              implementation: Implementation = "auto", cache: CacheView | None = None) -> jax.Array:
    """Dot-product attention with segment and causal masking, through the implementation `implementation` names
    (`auto`: the fastest correct one for the backend, dtype and kind of call).

    q: [B, Tq, q_heads, D]; k, v: [B, Tk, kv_heads, D]; segments/positions: [B, Tq] and [B, Tk].
    Segments None (both): causal masking only, queries and keys aligned (self-attention over a whole row).
    cache: given when k/v are a KV cache (Tk slots) that the Tq new tokens were just written into.
    Returns [B, Tq, q_heads, D].
    """
    segmented = q_segments is not None
    if not segmented and (not causal or q.shape[1] != k.shape[1] or cache is not None):
        raise ValueError("attention without segment ids is causal self-attention over whole rows only")
    impl = resolve_implementation(implementation, q.dtype, attention_kind(q.shape[1], causal, segmented, cache))
    if impl == "pallas":
        out = pallas_attention(q, k, v, q_segments=q_segments, kv_segments=kv_segments, causal=causal,
                               cache=cache)
        if out is not None:
            return out
        impl = "xla"
    if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got {q.dtype}; use 'xla' for f32")
    if not segmented:
        if impl == "cudnn":
            return cudnn_attention(q, k, v, None)
        ones = jnp.ones(q.shape[:2], jnp.int32)
        return xla_attention(q, k, v, attention_mask(ones, ones, q_positions, kv_positions, causal))
    mask = attention_mask(q_segments, kv_segments, q_positions, kv_positions, causal)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask)
