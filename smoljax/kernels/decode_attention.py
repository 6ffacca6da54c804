"""Decode attention for GPUs in Pallas (Triton): one new query per row against the KV cache.

Grouped-query attention reads each K/V block once for the whole query group; the cache is split over the sequence
(split-K) so a small batch still fills the GPU, and each row reads only its own live slots [start, end): the left
padding of a short prompt and the unwritten tail of the cache are skipped block by block, not masked. Partial
results of the splits are merged with their log-sum-exps in a small XLA fusion.

The reference is `smoljax.attention.xla_attention` with the cache's segment mask; `tests/test_kernels.py` holds the
two side by side.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2_E = math.log2(math.e)
MIN_DOT_ROWS = 16  # Triton's matrix instructions need at least 16 rows: the query group is padded to this
TARGET_PROGRAMS = 264  # two programs per H100 SM: enough splits that a batch-1 step fills the GPU


def _decode_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, seg_ref, *out_refs, scale: float, block_k: int,
                   blocks_per_split: int):
    # out_refs: the normalised output (one split), or the split's unnormalised output, max and sum (merged later).
    row, split = pl.program_id(0), pl.program_id(2)
    start, end = start_ref[row], end_ref[row]
    first = jnp.maximum(split * blocks_per_split, start // block_k)
    last = jnp.minimum((split + 1) * blocks_per_split, (end + block_k - 1) // block_k)
    q = q_ref[...]

    def body(kb, carry):
        acc, m_prev, l_prev = carry
        k_slice = pl.ds(kb * block_k, block_k)
        scores = jnp.dot(q, k_ref[k_slice, :].T, preferred_element_type=jnp.float32) * scale
        index = kb * block_k + jnp.arange(block_k)
        live = (index >= start) & (index < end) & (seg_ref[k_slice] != 0)
        scores = jnp.where(live[None, :], scores, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        probs = jnp.exp2(scores - m_safe[:, None])
        rescale = jnp.exp2(m_prev - m_safe)
        acc = acc * rescale[:, None] + jnp.dot(probs.astype(v_ref.dtype), v_ref[k_slice, :],
                                               preferred_element_type=jnp.float32)
        return acc, m_next, rescale * l_prev + jnp.sum(probs, axis=1)

    rows, head_dim = q_ref.shape
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(first, jnp.maximum(first, last), body, init)
    if len(out_refs) == 1:
        out_refs[0][...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_refs[0].dtype)
        return
    o_ref, m_ref, l_ref = out_refs
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array, exp=jnp.exp2) -> jax.Array:
    """acc [..., splits, G, D] (unnormalised), m, l [..., splits, G] -> [..., G, D]; zeros where nothing is live.

    m: each split's running max in the base of `exp` (this module's kernel works in base 2, the TPU one in base e);
    an empty split has m = -inf (or a finite mask value) and l = 0, so it weighs nothing."""
    m_max = jnp.max(m, axis=-2, keepdims=True)
    weight = exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))
    total = jnp.sum(weight * l, axis=-2)
    out = jnp.sum(weight[..., None] * acc, axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def choose_splits(batch: int, kv_heads: int, num_blocks: int) -> int:
    """Splits of the sequence so that batch x kv_heads x splits programs fill the GPU, each with >= 1 block."""
    return max(1, min(num_blocks, TARGET_PROGRAMS // max(1, batch * kv_heads)))


def grouped_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_segments: jax.Array,
                             kv_start: jax.Array, kv_end: jax.Array, *, block_k: int = 64,
                             num_splits: int | None = None, interpret: bool = False) -> jax.Array:
    """The kernel on queries already grouped by KV head: q [B, Hkv, R, D], R >= 16 rows (the group's queries
    first, the rest ignored). Other arguments as `decode_attention`; S a multiple of block_k. Returns
    [B, Hkv, R, D] in q's dtype. With one split the kernel writes the normalised result itself (one launch)."""
    batch, kv_heads, rows, head_dim = q.shape
    num_blocks = k.shape[1] // block_k
    splits = num_splits or choose_splits(batch, kv_heads, num_blocks)
    blocks_per_split = -(-num_blocks // splits)
    kernel = functools.partial(_decode_kernel, scale=head_dim ** -0.5 * LOG2_E, block_k=block_k,
                               blocks_per_split=blocks_per_split)
    acc_spec = pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))
    if splits == 1:
        out_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        out_specs = [acc_spec, row_spec, row_spec]
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)]
    from jax.experimental.pallas import triton as plgpu
    outs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((batch,), lambda b, h, s: (0,)),
            pl.BlockSpec((batch,), lambda b, h, s: (0,)),
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, k.shape[1], None, head_dim), lambda b, h, s: (b, 0, h, 0)),
            pl.BlockSpec((None, k.shape[1], None, head_dim), lambda b, h, s: (b, 0, h, 0)),
            pl.BlockSpec((None, k.shape[1]), lambda b, h, s: (b, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="smoljax_decode_attention",
    )(kv_start.astype(jnp.int32), kv_end.astype(jnp.int32), q, k, v, kv_segments.astype(jnp.int32))
    if splits == 1:
        return outs[0]
    return merge_splits(*outs).astype(q.dtype)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_segments: jax.Array, kv_start: jax.Array,
                     kv_end: jax.Array, *, block_k: int = 64, num_splits: int | None = None,
                     interpret: bool = False) -> jax.Array:
    """Attention of one query per row over a KV cache (Pallas, Triton backend).

    q: [B, Hq, D]; k, v: [B, S, Hkv, D] (Hq a multiple of Hkv); kv_segments: [B, S] int (0 = empty or padding);
    kv_start, kv_end: [B] int, the live slots [start, end) of each row (blocks outside are never read).
    Returns [B, Hq, D] in q's dtype; a row with no live slot gives zeros. S need not be a multiple of `block_k`
    (the cache is then padded, a copy: allocate caches in whole blocks to avoid it).
    """
    batch, q_heads, head_dim = q.shape
    cache_len, kv_heads = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    group = q_heads // kv_heads
    if cache_len % block_k:
        pad = block_k - cache_len % block_k
        k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (k, v))
        kv_segments = jnp.pad(kv_segments, [(0, 0), (0, pad)])
    rows = max(MIN_DOT_ROWS, pl.next_power_of_2(group))
    q_grouped = q.reshape(batch, kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, [(0, 0), (0, 0), (0, rows - group), (0, 0)])
    out = grouped_decode_attention(q_grouped, k, v, kv_segments, kv_start, kv_end, block_k=block_k,
                                   num_splits=num_splits, interpret=interpret)
    return out[:, :, :group].reshape(batch, q_heads, head_dim)
