"""Attention kernels for TPUs in Pallas (Mosaic): self-attention through splash attention, and decode attention.

- `flash_attention_tpu`: causal or bidirectional self-attention with segment ids, differentiable. It wraps the splash
  attention kernels that ship with JAX (`jax.experimental.pallas.ops.tpu.splash_attention`), whose block-sparse masks
  skip the tiles above the causal diagonal and whose custom VJP has its own backward kernels.
- `decode_attention_tpu`: one new query per row against a KV cache, our own kernel: split-K over the cache with an
  online softmax, K/V blocks outside a row's live slots [start, end) neither computed nor fetched.

Both follow `smoljax.attention`: q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq a multiple of Hkv (grouped queries, K/V
never repeated), segment 0 = padding, scale head_dim ** -0.5, softmax in f32, zeros for a query that sees no key.
The reference is `smoljax.attention.xla_attention`; `tests/test_kernels_tpu.py` runs both side by side in Pallas's
interpreters on a CPU.

Interpret modes (CPU tests; on a CPU `interpret=False` fails, there is no silent fallback to XLA):
- decode, `interpret=True`: Pallas's TPU interpreter (`pltpu.InterpretParams()`), which simulates VMEM/SMEM, the
  DMAs the index maps ask for and scalar prefetch, and raises on out-of-bounds reads.
- flash, `interpret=True`: passed to splash as is, i.e. the generic HLO interpreter, which runs the batch-vmapped
  splash kernels; an `InterpretParams` selects the TPU interpreter, with the batch then run as a loop.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from smoljax.kernels.decode_attention import merge_splits

LANES = 128  # TPU vector lanes: minor block dimensions are multiples of this (or the whole axis)
FLASH_BLOCKS = (512, 256, 128)  # splash tile sizes tried for the padded length, largest first
MASK_VALUE = -1e30  # finite "minus infinity": exp(MASK_VALUE - MASK_VALUE) stays a number, never NaN


def _decode_interpret(interpret: bool | Any) -> bool | Any:
    """What the decode pallas_call gets: True means the TPU interpreter, which simulates VMEM/SMEM, the DMAs of
    the index maps and scalar prefetch, fills scratch with NaN and raises on out-of-bounds reads; False compiles
    with Mosaic; an `InterpretParams` passes through."""
    return pltpu.InterpretParams() if interpret is True else interpret


def _over_batch(fn, interpret: bool | Any, *args):
    """fn mapped over the leading (batch) axis of args: vmap, which adds a grid axis to the kernels; or, under the
    TPU interpreter (an `InterpretParams`), a lax.map loop, because that interpreter (jax 0.10) rejects the grid
    axis vmap adds (its dimension_semantics no longer match the grid)."""
    if isinstance(interpret, bool):
        return jax.vmap(fn)(*args)
    return lax.map(lambda xs: fn(*xs), args)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------------
# Self-attention: splash attention
# ----------------------------------------------------------------------------------------------------------------

def _uniform_blocks(block: int) -> splash.BlockSizes:
    """One tile size for the forward and both backward kernels."""
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def _flash_blocks(length: int, block_sizes: splash.BlockSizes | int | None) -> tuple[splash.BlockSizes, int]:
    """Splash tile sizes and the sequence length padded to a multiple of all of them.

    None: the largest of 512/256/128 that divides the length rounded up to 128 lanes (no padding beyond that)."""
    if isinstance(block_sizes, splash.BlockSizes):
        sizes = [b for b in (block_sizes.block_q, block_sizes.block_kv, block_sizes.block_q_dkv,
                             block_sizes.block_kv_dkv, block_sizes.block_q_dq, block_sizes.block_kv_dq) if b]
        return block_sizes, _round_up(length, math.lcm(*sizes))
    if block_sizes is None:
        padded = _round_up(length, LANES)
        return _uniform_blocks(next(b for b in FLASH_BLOCKS if padded % b == 0)), padded
    if block_sizes <= 0 or block_sizes % LANES:
        raise ValueError(f"flash block size must be a positive multiple of {LANES}, got {block_sizes}")
    return _uniform_blocks(block_sizes), _round_up(length, block_sizes)


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, q_heads: int, causal: bool, blocks: splash.BlockSizes, interpret: Any):
    """A splash MHA kernel for [q_heads, length, D] queries. Splash handles grouped K/V itself (query head h reads
    kv head h // G) in the forward and the backward kernels. Built once per shape: the block-sparsity tables are
    computed in numpy from the mask."""
    head_mask = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    mask = splash.MultiHeadMask([head_mask] * q_heads)
    with jax.ensure_compile_time_eval():  # the tables are constants, never tracers, even when first built under jit
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _heads_major(x: jax.Array, length: int, head_dim: int) -> jax.Array:
    """[B, T, H, D] -> [B, H, length, head_dim], zero padded: splash's layout with whole 128-lane heads."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, head_dim - x.shape[3])))


def _flash_segment_ids(q_segments: jax.Array | None, kv_segments: jax.Array | None, batch: int, length: int,
                       padded: int, causal: bool):
    """Batched splash SegmentIds [B, padded] (padding = segment 0), or None when no masking beyond the mask is
    needed: no segments and either no padding or causal order (which already hides the padded tail from real
    queries)."""
    if q_segments is None:
        if padded == length or causal:
            return None
        q_segments = kv_segments = jnp.ones((batch, length), jnp.int32)
    pad = ((0, 0), (0, padded - length))
    return splash.SegmentIds(q=jnp.pad(q_segments.astype(jnp.int32), pad),
                             kv=jnp.pad(kv_segments.astype(jnp.int32), pad))


def _first_index(kv_segments: jax.Array, values: jax.Array) -> jax.Array:
    """For one row: the first index of each value in kv_segments [T], or T if absent. Sort-based, O(T log T)."""
    order = jnp.argsort(kv_segments, stable=True)
    ordered = kv_segments[order]
    at = jnp.clip(jnp.searchsorted(ordered, values), 0, ordered.shape[0] - 1)
    return jnp.where(ordered[at] == values, order[at], ordered.shape[0])


def _has_visible_key(q_segments: jax.Array, kv_segments: jax.Array, causal: bool) -> jax.Array:
    """[B, T] bool: the query sees at least one key (a nonzero segment present in the keys, at or before it if causal).
    Splash gives such rows an average of masked values instead of zeros, so the wrapper zeroes them."""
    q_segments, kv_segments = q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32)
    first = jax.vmap(_first_index)(kv_segments, q_segments)
    limit = jnp.arange(q_segments.shape[1]) if causal else kv_segments.shape[1] - 1
    return (q_segments != 0) & (first <= limit)


def _check_flash_args(q, k, v, q_segments, kv_segments) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k, v [B, T, Hkv, D], got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"flash_attention_tpu is self-attention: Tq ({q.shape[1]}) must equal Tk ({k.shape[1]})")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if (q_segments is None) != (kv_segments is None):
        raise ValueError("pass both q_segments and kv_segments, or neither")
    if q_segments is not None and (q_segments.shape != q.shape[:2] or kv_segments.shape != k.shape[:2]):
        raise ValueError(f"segments must be [B, T] = {q.shape[:2]}, got {q_segments.shape} and {kv_segments.shape}")


def flash_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segments: jax.Array | None = None,
                        kv_segments: jax.Array | None = None, causal: bool = True,
                        block_sizes: splash.BlockSizes | int | None = None,
                        interpret: bool | Any = False) -> jax.Array:
    """Self-attention with splash attention (Pallas TPU), differentiable in q, k and v.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq % Hkv == 0 (K/V are not repeated: splash maps query head h to kv
    head h // G). q_segments, kv_segments: [B, T] int (0 = padding) or both None (one document per row, no padding).
    causal: a query sees keys at or before its own index (index order = position order within a segment).
    block_sizes: a splash `BlockSizes` (backward blocks needed for gradients), one int for every tile (a multiple of
    128), or None for the largest of 512/256/128 that divides T rounded up to 128.
    interpret: True runs splash in the HLO interpreter (CPU), an `InterpretParams` in the TPU interpreter.
    Returns [B, T, Hq, D] in q's dtype; zeros for queries that see no key (padding), which also get no gradient.

    T is padded with segment 0 to a multiple of the tile and D with zeros to a multiple of 128 lanes (exact: zero
    columns add nothing to q.k and give zero output columns, sliced away). Splash does not scale the scores, so q is
    multiplied by D ** -0.5 first (exact in bf16 for D = 64).
    """
    _check_flash_args(q, k, v, q_segments, kv_segments)
    batch, length, q_heads, head_dim = q.shape
    blocks, padded = _flash_blocks(length, block_sizes)
    lanes = _round_up(head_dim, LANES)
    kernel = _splash_kernel(padded, q_heads, causal, blocks, interpret)
    qh = _heads_major(q * (head_dim ** -0.5), padded, lanes)
    kh, vh = _heads_major(k, padded, lanes), _heads_major(v, padded, lanes)
    segment_ids = _flash_segment_ids(q_segments, kv_segments, batch, length, padded, causal)
    if segment_ids is None:
        out = _over_batch(lambda q_, k_, v_: kernel(q_, k_, v_), interpret, qh, kh, vh)
    else:
        out = _over_batch(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_), interpret, qh, kh, vh,
                          segment_ids)
    out = jnp.swapaxes(out[:, :, :length, :head_dim], 1, 2)
    if q_segments is not None:
        visible = _has_visible_key(q_segments, kv_segments, causal)
        out = jnp.where(visible[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Decode: one query per row against a KV cache
# ----------------------------------------------------------------------------------------------------------------

def _live_block(row, split, step, start_ref, end_ref, *, block: int, per_split: int, num_blocks: int):
    """The K/V block a grid step reads, clamped to the row's live blocks: steps outside [start, end) repeat a
    neighbour's block index, so the pipeline issues no new DMA for them."""
    first = jnp.minimum(start_ref[row] // block, num_blocks - 1)
    last = jnp.maximum((end_ref[row] + block - 1) // block - 1, first)
    return jnp.clip(split * per_split + step, first, last)


def _decode_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, seg_ref, acc_ref, max_ref, sum_ref, max_scratch,
                   sum_scratch, acc_scratch, *, scale: float, block: int, per_split: int):
    """Grid (row, split, step): accumulates one K/V block of all heads into the split's online softmax.

    q_ref [Hq, Hkv*D] block-diagonal queries; k_ref, v_ref [block, Hkv*D]; seg_ref [1, block];
    acc_ref [Hq, Hkv*D] (unnormalised), max_ref, sum_ref [Hq, LANES] (softmax max and sum, repeated over lanes)."""
    row, split, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[row], end_ref[row]
    first_slot = (split * per_split + step) * block

    @pl.when(step == 0)
    def _init():
        max_scratch[...] = jnp.full_like(max_scratch, MASK_VALUE)
        sum_scratch[...] = jnp.zeros_like(sum_scratch)
        acc_scratch[...] = jnp.zeros_like(acc_scratch)

    @pl.when((first_slot < end) & (first_slot + block > start))  # blocks outside [start, end): no compute
    def _accumulate():
        q = q_ref[...]
        slots = first_slot + lax.broadcasted_iota(jnp.int32, (1, block), 1)
        visible = (slots >= start) & (slots < end) & (seg_ref[...] != 0)  # [1, block]
        scores = lax.dot_general(q, k_ref[...].astype(q.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [Hq, block]
        scores = jnp.where(visible, scores, MASK_VALUE)
        m_prev = max_scratch[...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))  # [Hq, LANES]
        probs = jnp.where(visible, jnp.exp(scores - m_next[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        max_scratch[...] = m_next
        sum_scratch[...] = alpha * sum_scratch[...] + jnp.sum(probs, axis=1, keepdims=True)
        # Slots outside [start, end) may hold anything (the unwritten tail, or past the cache's end in the last
        # block): zero them so 0 * garbage cannot make a NaN.
        slot_column = first_slot + lax.broadcasted_iota(jnp.int32, (block, 1), 0)
        v = v_ref[...]
        v = jnp.where((slot_column >= start) & (slot_column < end), v, jnp.zeros((), v.dtype))
        acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + jnp.dot(
            probs.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(step == per_split - 1)
    def _store():
        acc_ref[...] = acc_scratch[...]
        max_ref[...] = max_scratch[...]
        sum_ref[...] = sum_scratch[...]


def _block_diagonal_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, Hq, D] -> [B, Hq, Hkv*D]: query head h*G+g keeps its D values in kv head h's columns, zeros elsewhere."""
    batch, q_heads, head_dim = q.shape
    grouped = q.reshape(batch, kv_heads, q_heads // kv_heads, 1, head_dim)
    own = jnp.eye(kv_heads, dtype=bool)[None, :, None, :, None]
    return jnp.where(own, grouped, jnp.zeros((), q.dtype)).reshape(batch, q_heads, kv_heads * head_dim)


def _own_head_columns(out: jax.Array, kv_heads: int) -> jax.Array:
    """[B, Hq, Hkv*D] -> [B, Hq, D]: each query head's output in its own kv head's columns."""
    batch, q_heads, width = out.shape
    out = out.reshape(batch, kv_heads, q_heads // kv_heads, kv_heads, width // kv_heads)
    return jnp.moveaxis(jnp.diagonal(out, axis1=1, axis2=3), -1, 1).reshape(batch, q_heads, width // kv_heads)


def _check_decode_args(q, k, v, kv_segments, kv_start, kv_end, block_k, num_splits) -> None:
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, Hq, D] and k, v [B, S, Hkv, D], got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[1] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[2]})")
    if kv_segments.shape != k.shape[:2]:
        raise ValueError(f"kv_segments must be [B, S] = {k.shape[:2]}, got {kv_segments.shape}")
    if kv_start.shape != (q.shape[0],) or kv_end.shape != (q.shape[0],):
        raise ValueError(f"kv_start and kv_end must be [B] = ({q.shape[0]},), got {kv_start.shape}, {kv_end.shape}")
    if block_k <= 0 or block_k % LANES:
        raise ValueError(f"block_k must be a positive multiple of {LANES}, got {block_k}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")


def decode_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, kv_segments: jax.Array, kv_start: jax.Array,
                         kv_end: jax.Array, *, block_k: int = 128, num_splits: int = 2,
                         interpret: bool | Any = False) -> jax.Array:
    """Attention of one new query per row over a KV cache (Pallas TPU kernel).

    q: [B, Hq, D]; k, v: [B, S, Hkv, D] (the cache, any S) with Hq % Hkv == 0; kv_segments: [B, S] int (0 = empty
    or padding slot); kv_start, kv_end: [B] int, slots [kv_start, kv_end) of a row may be visible (clipped to
    [0, S]). interpret: True runs the kernel in the TPU interpreter (CPU).
    Returns [B, Hq, D] in q's dtype, f32 math; zeros for a row with no visible slot.

    Grid (row, split, block): the cache is cut into `num_splits` ranges of `block_k` slots (block_k a multiple of
    128; a cache shorter than block_k is one block), each with its own online softmax; the partial results are
    merged with their maxima and sums in XLA. kv_start/kv_end are scalar-prefetched: blocks outside [start, end) are
    skipped and their index maps repeat a live block, so they cost no DMA either.

    Layout: the kernel reads the cache as [B, S, Hkv*D] (a reshape of [B, S, Hkv, D], heads side by side in the
    lanes); it is not transposed to [B, Hkv, S, D]. One grid step loads a K/V block of all kv heads once, and the
    queries enter as block-diagonal [Hq, Hkv*D] rows (query head h*G+g is zero outside kv head h's columns), so one
    matmul scores every query group against its own head only, and the output keeps the diagonal blocks. This
    spends Hkv times the minimal MXU work (Hq flops per K/V element, far below the TPU's ridge while decode is
    HBM-bound) to avoid both a cache transpose per step and 64-lane head slices that are not tile-aligned.
    Note: XLA on TPU tiles the two minor dims of an array, so a cache stored as [B, S, Hkv, D] is relaid out by the
    reshape (a copy per step); a TPU-native cache stored as [B, S, Hkv*D] makes it free. Segments are read as
    [B, 1, S], so that a row's [1, block] slice is a legal TPU block (a small copy: 4 bytes per slot).
    """
    _check_decode_args(q, k, v, kv_segments, kv_start, kv_end, block_k, num_splits)
    batch, q_heads, head_dim = q.shape
    _, length, kv_heads, _ = k.shape
    width = kv_heads * head_dim
    block = length if length <= block_k else block_k  # a block equal to the whole axis satisfies TPU tiling
    num_blocks = pl.cdiv(length, block)
    splits = min(num_splits, num_blocks)
    per_split = pl.cdiv(num_blocks, splits)

    end = jnp.clip(kv_end.astype(jnp.int32), 0, length)
    start = jnp.clip(kv_start.astype(jnp.int32), 0, end)
    q_wide = _block_diagonal_queries(q.astype(jnp.result_type(q.dtype, k.dtype)), kv_heads)
    segments = kv_segments.astype(jnp.int32).reshape(batch, 1, length)

    kv_block = functools.partial(_live_block, block=block, per_split=per_split, num_blocks=num_blocks)
    kv_spec = pl.BlockSpec((None, block, width), lambda b, s, j, st, en: (b, kv_block(b, s, j, st, en), 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, splits, per_split),
        in_specs=[
            pl.BlockSpec((None, q_heads, width), lambda b, s, j, st, en: (b, 0, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, 1, block), lambda b, s, j, st, en: (b, 0, kv_block(b, s, j, st, en))),
        ],
        out_specs=[
            pl.BlockSpec((None, None, q_heads, width), lambda b, s, j, st, en: (b, s, 0, 0)),
            pl.BlockSpec((None, None, q_heads, LANES), lambda b, s, j, st, en: (b, s, 0, 0)),
            pl.BlockSpec((None, None, q_heads, LANES), lambda b, s, j, st, en: (b, s, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((q_heads, LANES), jnp.float32), pltpu.VMEM((q_heads, LANES), jnp.float32),
                        pltpu.VMEM((q_heads, width), jnp.float32)],
    )
    acc, maxes, sums = pl.pallas_call(
        functools.partial(_decode_kernel, scale=head_dim ** -0.5, block=block, per_split=per_split),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((batch, splits, q_heads, width), jnp.float32),
                   jax.ShapeDtypeStruct((batch, splits, q_heads, LANES), jnp.float32),
                   jax.ShapeDtypeStruct((batch, splits, q_heads, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_decode_interpret(interpret),
        name="smoljax_decode_attention",
    )(start, end, q_wide, k.reshape(batch, length, width), v.reshape(batch, length, width), segments)
    out = merge_splits(acc, maxes[..., 0], sums[..., 0], exp=jnp.exp)
    return _own_head_columns(out, kv_heads).astype(q.dtype)
