"""Decode attention for GPUs in Pallas (Triton): one new query per row against the KV cache.

Grouped-query attention reads each K/V block once for the whole query group; the cache is split over the sequence
(split-K) so a small batch still fills the GPU, and each row reads only its own live slots [start, end): the left
padding of a short prompt and the unwritten tail of the cache are skipped block by block, not masked. Partial
results of the splits are merged with their log-sum-exps in a small XLA fusion, or handed unmerged to the fused
batch-1 decode layer, whose o-projection kernel merges them (`smoljax.kernels.decode_layer`).

The reference is `smoljax.attention.xla_attention` with the cache's segment mask (for `append_and_attend`,
`append_and_attend_reference`); `tests/test_kernels.py` holds each kernel and its reference side by side.
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


def _online_softmax_step(carry, scores, weighted_values):
    """One step of the online softmax. carry: (acc [R, D], running max [R], running sum [R]); scores [R, K] in base
    2, -inf where masked; weighted_values maps the probabilities [R, K] to their sum over the values [R, D]."""
    acc, m_prev, l_prev = carry
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    probs = jnp.exp2(scores - m_safe[:, None])
    rescale = jnp.exp2(m_prev - m_safe)
    return acc * rescale[:, None] + weighted_values(probs), m_next, rescale * l_prev + jnp.sum(probs, axis=1)


def _decode_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, seg_ref, *out_refs, scale: float, block_k: int,
                   blocks_per_split: int):
    # out_refs: the normalised output (one split), or the split's unnormalised output, max and sum (merged later).
    row, split = pl.program_id(0), pl.program_id(2)
    start, end = start_ref[row], end_ref[row]
    first = jnp.maximum(split * blocks_per_split, start // block_k)
    last = jnp.minimum((split + 1) * blocks_per_split, (end + block_k - 1) // block_k)
    q = q_ref[...]

    def body(kb, carry):
        k_slice = pl.ds(kb * block_k, block_k)
        scores = jnp.dot(q, k_ref[k_slice, :].T, preferred_element_type=jnp.float32) * scale
        index = kb * block_k + jnp.arange(block_k)
        live = (index >= start) & (index < end) & (seg_ref[k_slice] != 0)
        scores = jnp.where(live[None, :], scores, -jnp.inf)
        return _online_softmax_step(carry, scores, lambda probs: jnp.dot(
            probs.astype(v_ref.dtype), v_ref[k_slice, :], preferred_element_type=jnp.float32))

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


# Up to this many splits the merge is written split by split (see `merge_splits`); beyond it, as reductions, which
# keep the program small: 88 splits written out make a 30-layer step's merges ~50x larger to compile.
UNROLLED_MERGE_MAX_SPLITS = 8


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array, exp=jnp.exp2) -> jax.Array:
    """acc [..., splits, G, D] (unnormalised), m, l [..., splits, G] -> [..., G, D]; zeros where nothing is live.

    m: each split's running max in the base of `exp` (this module's kernel works in base 2, the TPU one in base e);
    an empty split has m = -inf (or a finite mask value) and l = 0, so it weighs nothing. With few splits (short
    caches, the common decode) it is written as elementwise maxima and sums over the splits' slices, which XLA emits
    as one fusion instead of two for the reductions (`benchmarks/NOTES-kernels.md` §19)."""
    splits = m.shape[-2]
    if splits <= UNROLLED_MERGE_MAX_SPLITS:
        return merge_split_list([m[..., s, :] for s in range(splits)], [l[..., s, :] for s in range(splits)],
                                [acc[..., s, :, :] for s in range(splits)], exp)
    m_max = jnp.max(m, axis=-2)
    m_safe = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weight = exp(m - m_safe[..., None, :])
    total = jnp.sum(weight * l, axis=-2)
    out = jnp.sum(weight[..., None] * acc, axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def merge_split_list(maxima: list[jax.Array], sums: list[jax.Array], accs: list[jax.Array],
                     exp=jnp.exp2) -> jax.Array:
    """`merge_splits` on the splits given one by one (maxima, sums [..., G]; accs [..., G, D] each), as elementwise
    maxima and sums: the form XLA fuses, and the one a Pallas kernel can run on splits it loads separately."""
    m_max = functools.reduce(jnp.maximum, maxima)
    m_safe = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weights = [exp(m - m_safe) for m in maxima]
    total = sum(w * l for w, l in zip(weights, sums))
    out = sum(w[..., None] * acc for w, acc in zip(weights, accs))
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


# A decode step's attention with its neighbours folded in: RoPE on the new query and key, the cache write of the
# new key and value, and the group layout of the heads. Around `decode_attention` these take three launches a layer
# (RoPE with the query's padding to 16 rows, and one dynamic-update-slice each for K and V, RoPE fused in); in a
# batch-1 step, which is bound by launches, each costs about half a matrix-vector product.


def _rope_halves(first, second, cos_ref, sin_ref, dtype):
    """RoPE with half-split pairs (i, i + D/2) on the two halves [..., D/2] of heads, in f32, rounded to `dtype`
    as the XLA path stores it."""
    half = cos_ref.shape[0] // 2
    cos_first, cos_second = (cos_ref[pl.ds(i * half, half)].astype(jnp.float32) for i in (0, 1))
    sin_first, sin_second = (sin_ref[pl.ds(i * half, half)].astype(jnp.float32) for i in (0, 1))
    first, second = (x.astype(jnp.float32) for x in (first, second))
    rotated_first = first * cos_first - second * sin_first
    rotated_second = second * cos_second + first * sin_second
    return rotated_first.astype(dtype), rotated_second.astype(dtype)


def _append_attend_kernel(start_ref, end_ref, qkv_ref, cos_ref, sin_ref, seg_ref, _k_in, _v_in, *out_refs,
                          scale: float, block_k: int, blocks_per_split: int, group: int, rows: int, q_heads: int,
                          kv_heads: int):
    # out_refs: (out, k_cache, v_cache) with one split, else (partial out, max, sum, k_cache, v_cache).
    *result_refs, k_ref, v_ref = out_refs
    row, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[row], end_ref[row]
    slot = end - 1  # the new token's slot: its key and value come from registers, not from the cache
    half = qkv_ref.shape[1] // 2
    dtype = qkv_ref.dtype
    from jax.experimental.pallas import triton as plgpu

    # The group's query heads as one [rows, D/2] tile per half (rows past the group masked to zero), for the MMAs.
    group_rows = pl.ds(kv_head * group, rows)
    in_group = jnp.arange(rows) < group
    q_first, q_second = _rope_halves(
        *(plgpu.load(qkv_ref.at[group_rows, pl.ds(i * half, half)], mask=in_group[:, None], other=0.0)
          for i in (0, 1)), cos_ref, sin_ref, dtype)
    key_row = q_heads + kv_head
    k_first, k_second = _rope_halves(qkv_ref[key_row, pl.ds(0, half)], qkv_ref[key_row, pl.ds(half, half)],
                                     cos_ref, sin_ref, dtype)
    new_value = qkv_ref[q_heads + kv_heads + kv_head, :]

    first = jnp.maximum(split * blocks_per_split, start // block_k)
    last = jnp.minimum((split + 1) * blocks_per_split, (slot + block_k - 1) // block_k)

    def body(kb, carry):
        k_slice = pl.ds(kb * block_k, block_k)
        scores = (jnp.dot(q_first, k_ref[k_slice, pl.ds(0, half)].T, preferred_element_type=jnp.float32)
                  + jnp.dot(q_second, k_ref[k_slice, pl.ds(half, half)].T, preferred_element_type=jnp.float32))
        index = kb * block_k + jnp.arange(block_k)
        live = (index >= start) & (index < slot) & (seg_ref[k_slice] != 0)
        scores = jnp.where(live[None, :], scores * scale, -jnp.inf)
        return _online_softmax_step(carry, scores, lambda probs: jnp.dot(
            probs.astype(v_ref.dtype), v_ref[k_slice, :], preferred_element_type=jnp.float32))

    init = (jnp.zeros((rows, 2 * half), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(first, jnp.maximum(first, last), body, init)

    # Split 0 folds the new key in (the merge weighs it the same from any split) and writes it and its value to the
    # cache; the other splits never read that slot.
    owner = split == 0
    new_scores = (jnp.sum(q_first.astype(jnp.float32) * k_first.astype(jnp.float32)[None, :], axis=1)
                  + jnp.sum(q_second.astype(jnp.float32) * k_second.astype(jnp.float32)[None, :], axis=1))
    new_live = owner & (seg_ref[slot] != 0)
    acc, m, l = _online_softmax_step(carry, jnp.where(new_live, new_scores * scale, -jnp.inf)[:, None],
                                     lambda probs: probs * new_value.astype(jnp.float32)[None, :])

    @pl.when(owner)
    def _():
        k_ref[slot, pl.ds(0, half)] = k_first.astype(k_ref.dtype)
        k_ref[slot, pl.ds(half, half)] = k_second.astype(k_ref.dtype)
        v_ref[slot, :] = new_value.astype(v_ref.dtype)

    if len(result_refs) == 1:
        out = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(result_refs[0].dtype)
        plgpu.store(result_refs[0].at[group_rows, :], out, mask=in_group[:, None])
    else:
        plgpu.store(result_refs[0].at[group_rows, :], acc, mask=in_group[:, None])
        plgpu.store(result_refs[1].at[group_rows], m, mask=in_group)
        plgpu.store(result_refs[2].at[group_rows], l, mask=in_group)


def append_and_attend(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                      kv_segments: jax.Array, kv_start: jax.Array, kv_end: jax.Array, *, q_heads: int,
                      block_k: int = 64, num_splits: int | None = None, num_warps: int = 4,
                      merge: bool = True, interpret: bool = False) -> tuple:
    """One decode step's attention from the q/k/v projection: RoPE, the cache write and split-K attention in one
    kernel (plus the merge of the splits when there are several).

    qkv: [B, Hq + 2 * Hkv, D], the new token's query, key and value heads before RoPE; cos, sin: [B, D] for its
    position (half-split RoPE); k_cache, v_cache: [B, S, Hkv, D], S a multiple of block_k, updated in place at slot
    kv_end - 1; kv_segments [B, S] (already holding the new token's segment; 0 = never attended to); kv_start,
    kv_end: [B] int, each row's live slots [start, end) including the new one.
    Returns (attention output [B, Hq, D] in qkv's dtype, k_cache, v_cache); with `merge=False`, the splits'
    partial results instead of the output, for a consumer that merges them itself (`merge_splits`):
    ((acc [B, splits, Hq, D], max [B, splits, Hq], sum [B, splits, Hq]) in f32, k_cache, v_cache).
    """
    batch, heads, head_dim = qkv.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if (heads - q_heads) != 2 * kv_heads or q_heads % kv_heads:
        raise ValueError(f"qkv has {heads} heads; expected {q_heads} query heads (a multiple of the cache's "
                         f"{kv_heads} key/value heads) plus {2 * kv_heads} key and value heads")
    if cache_len % block_k:
        raise ValueError(f"the cache has {cache_len} slots, not a whole number of {block_k}-slot blocks; "
                         "allocate it with smoljax.cache.whole_blocks")
    num_blocks, group = cache_len // block_k, q_heads // kv_heads
    splits = num_splits or choose_splits(batch, kv_heads, num_blocks)
    blocks_per_split = -(-num_blocks // splits)
    kernel = functools.partial(_append_attend_kernel, scale=head_dim ** -0.5 * LOG2_E, block_k=block_k,
                               blocks_per_split=blocks_per_split, group=group,
                               rows=max(MIN_DOT_ROWS, pl.next_power_of_2(group)),
                               q_heads=q_heads, kv_heads=kv_heads)
    cache_spec = pl.BlockSpec((None, cache_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    if splits == 1 and merge:
        result_specs = [pl.BlockSpec((None, q_heads, head_dim), lambda b, h, s: (b, 0, 0))]
        result_shapes = [jax.ShapeDtypeStruct((batch, q_heads, head_dim), qkv.dtype)]
    else:
        stat_spec = pl.BlockSpec((None, None, q_heads), lambda b, h, s: (b, s, 0))
        result_specs = [pl.BlockSpec((None, None, q_heads, head_dim), lambda b, h, s: (b, s, 0, 0)),
                        stat_spec, stat_spec]
        result_shapes = [jax.ShapeDtypeStruct((batch, splits, q_heads, head_dim), jnp.float32),
                         jax.ShapeDtypeStruct((batch, splits, q_heads), jnp.float32),
                         jax.ShapeDtypeStruct((batch, splits, q_heads), jnp.float32)]
    from jax.experimental.pallas import triton as plgpu
    row_vector = pl.BlockSpec((None, head_dim), lambda b, h, s: (b, 0))
    *results, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((batch,), lambda b, h, s: (0,)),
            pl.BlockSpec((batch,), lambda b, h, s: (0,)),
            pl.BlockSpec((None, heads, head_dim), lambda b, h, s: (b, 0, 0)),
            row_vector, row_vector,
            pl.BlockSpec((None, cache_len), lambda b, h, s: (b, 0)),
            cache_spec, cache_spec,
        ],
        out_specs=[*result_specs, cache_spec, cache_spec],
        out_shape=[*result_shapes, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={6: len(result_shapes), 7: len(result_shapes) + 1},
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="smoljax_decode_append_attention",
    )(kv_start.astype(jnp.int32), kv_end.astype(jnp.int32), qkv, cos, sin, kv_segments.astype(jnp.int32),
      k_cache, v_cache)
    if not merge:
        return tuple(results), k_cache, v_cache
    out = results[0] if splits == 1 else merge_splits(*results).astype(qkv.dtype)
    return out, k_cache, v_cache


def append_and_attend_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                                v_cache: jax.Array, kv_segments: jax.Array, kv_start: jax.Array, kv_end: jax.Array, *,
                                q_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What `append_and_attend` computes, in XLA ops as the model's plain path runs it: RoPE, the cache writes
    (all rows at the same slot, kv_end[0] - 1, as in a left-padded batch) and `xla_attention`."""
    from smoljax import nn
    from smoljax.attention import xla_attention

    kv_heads = k_cache.shape[2]
    q, k, v = jnp.split(qkv[:, None], [q_heads, q_heads + kv_heads], axis=2)
    q, k = (nn.apply_rope(x, cos[:, None], sin[:, None]) for x in (q, k))
    slot = (0, kv_end[0] - 1, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), slot)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), slot)
    index = jnp.arange(k_cache.shape[1])
    live = (kv_segments != 0) & (index >= kv_start[:, None]) & (index < kv_end[:, None])
    out = xla_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), live[:, None, :])
    return out[:, 0], k_cache, v_cache
