"""Flash attention for GPUs in Pallas (Triton): forward and backward, causal or bidirectional, grouped-query
attention without repeating K/V, segment ids for packed sequences and padding, any sequence length.

The reference is `smoljax.attention.xla_attention`; `tests/test_kernels.py` holds the two side by side.

Semantics (those of `smoljax.attention`): query i of a row sits at key index `i + q_offset` (0 for self-attention;
the cache slot of the first new token when prefilling into a KV cache). With `causal`, it sees keys at indices <= its
own. With segment ids it sees only keys of its own segment, and never segment 0 (padding, empty cache slots). A query
that sees no key returns zeros. Positions are not read: within a segment they grow with the index in every caller,
so index order is position order.

The kernels work in base 2 (`exp2`, the instruction the GPU has): scores are scaled by head_dim^-0.5 * log2(e), and
the saved log-sum-exp is in that domain too.

Layouts: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (the model's own; BlockSpecs stride over heads, so nothing is
transposed), segment ids [B, T] int32, the log-sum-exp residual [B, Hq, Tq] f32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile sizes (powers of two) and Triton launch parameters, forward and backward.

    block_q x block_k is the score tile each program holds at a time: in the forward, and in each backward kernel
    (dK/dV: a program owns dkv_block_k keys and steps over dkv_block_q queries; dQ: it owns dq_block_q queries and
    steps over dq_block_k keys). The defaults were chosen on an H100 for head_dim 64
    (`benchmarks/bench_attention.py --sweep`; `benchmarks/NOTES-kernels.md`).
    """

    block_q: int = 64
    block_k: int = 64
    warps: int = 4
    stages: int = 3
    dkv_block_q: int = 64
    dkv_block_k: int = 64
    dq_block_q: int = 64
    dq_block_k: int = 64
    bwd_warps: int = 4
    bwd_stages: int = 2


DEFAULT_BLOCKS = FlashBlocks()


def _compiler_params(warps: int, stages: int):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _visible(q_index, k_index, q_seg, k_seg, causal: bool):
    """Which scores of a [bq, bk] tile count: causal order, same segment, never segment 0. None: all of them."""
    mask = None
    if causal:
        mask = k_index[None, :] <= q_index[:, None]
    if q_seg is not None:
        same = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
        mask = same if mask is None else mask & same
    return mask


def _causal_kv_blocks(q_start, q_offset, block_q: int, block_k: int, num_k_blocks: int):
    """Key blocks [0, n) that queries [q_start, q_start + block_q) can see under causal masking."""
    last_visible = q_offset + q_start + block_q - 1
    return jnp.minimum(last_visible // block_k + 1, num_k_blocks)


def _kv_loop(body, init, causal: bool, q_start, q_offset, block_q: int, block_k: int, num_k_blocks: int,
             one_segment=None, partners=None):
    """Runs body(key_block, carry, mask_causal[, mask_segments=False]) over the key blocks a query block sees.

    Under causal masking the blocks wholly before the query block's first index skip the causal compare (only the
    diagonal ones need it). one_segment: key blocks [first, end) whose keys all share the query block's one
    segment, which skip the segment compare too (None: every block compares). partners: key blocks [begin, stop)
    outside which no key can be visible (`_partner_blocks`; None: all of them)."""
    begin, stop = (0, num_k_blocks) if partners is None else partners
    if causal:
        upper = jnp.minimum(_causal_kv_blocks(q_start, q_offset, block_q, block_k, num_k_blocks), stop)
    else:
        upper = jnp.minimum(num_k_blocks, stop)
    upper = jnp.maximum(upper, begin)
    unmasked = jnp.clip((q_offset + q_start + 1) // block_k, begin, upper) if causal else upper
    carry = init
    for start, end, mask_causal in ((begin, unmasked, False), (unmasked, upper, True)):
        if mask_causal and not causal:
            continue
        for first, last, mask_segments in _segment_ranges(start, end, one_segment):
            carry = jax.lax.fori_loop(first, last, functools.partial(body, mask_causal=mask_causal,
                                                                     mask_segments=mask_segments), carry)
    return carry


def _segment_ranges(start, stop, one_segment):
    """Splits blocks [start, stop) into (begin, end, mask_segments) ranges: those inside one_segment = (first, end)
    skip the segment compare. one_segment None: the whole range compares."""
    if one_segment is None:
        return ((start, stop, True),)
    first = jnp.clip(one_segment[0], start, stop)
    end = jnp.clip(one_segment[1], first, stop)
    return (start, first, True), (first, end, False), (end, stop, True)


def _block_spans(own: jax.Array, other: jax.Array, block: int) -> jax.Array:
    """What each block of a kernel's own axis can skip. own: [B, T] segment ids along the axis the programs own
    (whole blocks of `block`), other: [B, S] those along the axis they loop over. Returns [B, T // block, 4] int32:
    (s, lo, hi, 0) where the block lies wholly in segment s != 0 and the positions of s along `other` are exactly
    [lo, hi) (only those can be visible, and blocks inside them skip the segment compare); (0, 0, 0, 1) where the
    block is all padding (nothing is visible); zeros where it is mixed, or s is split by a hole. Four columns:
    Triton blocks are powers of two."""
    batch, length = own.shape
    blocks = own.reshape(batch, length // block, block)
    segment = blocks[:, :, 0]
    in_segment = other[:, None, :] == segment[:, :, None]
    lo = jnp.argmax(in_segment, axis=-1).astype(jnp.int32)
    hi = (other.shape[1] - jnp.argmax(in_segment[..., ::-1], axis=-1)).astype(jnp.int32)
    one_segment = jnp.all(blocks == segment[:, :, None], axis=-1)
    clean = (one_segment & (segment != 0) & jnp.any(in_segment, axis=-1)
             & (jnp.sum(in_segment, axis=-1) == hi - lo))
    padding = one_segment & (segment == 0)
    spans = jnp.stack([segment, lo, hi, jnp.zeros_like(lo)], axis=-1).astype(jnp.int32)
    nothing_visible = jnp.broadcast_to(jnp.array([0, 0, 0, 1], jnp.int32), spans.shape)
    return jnp.where(clean[..., None], spans, jnp.where(padding[..., None], nothing_visible, 0))


def _whole_blocks_within(span_ref, block: int):
    """The blocks [first, end) of `block` positions that lie inside a span (s, lo, hi) read from span_ref."""
    lo, hi = span_ref[1], span_ref[2]
    return (lo + block - 1) // block, hi // block


def _partner_blocks(span_ref, block: int, num_blocks: int):
    """The blocks [begin, stop) of `block` positions along the looped axis that can hold a visible partner: those
    touching the span [lo, hi) of a one-segment block, none for a padding block, all of them otherwise."""
    lo, hi, padding = span_ref[1], span_ref[2], span_ref[3]
    clean = (hi > lo).astype(jnp.int32)  # integer arithmetic, not selects: Triton's select wants matching types
    begin = clean * (lo // block)
    stop = clean * ((hi + block - 1) // block) + (1 - clean) * (1 - padding) * num_blocks
    return begin, stop


# --- forward ----------------------------------------------------------------------------------------------------

def _forward_kernel(offset_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, span_ref, o_ref, lse_ref, *,
                    scale: float, causal: bool, block_q: int, block_k: int, num_q_blocks: int):
    # One program: one (batch row, query head, query block). Heavy causal blocks (the last ones) launch first.
    q_block = num_q_blocks - 1 - pl.program_id(0)
    q_start = q_block * block_q
    q_offset = offset_ref[0]
    num_k_blocks = k_ref.shape[0] // block_k
    q = q_ref[...]
    q_index = q_offset + q_start + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[pl.ds(q_start, block_q)]
    # Key blocks wholly inside this query block's one segment (none when the block is mixed or padding).
    one_segment = None if span_ref is None else _whole_blocks_within(span_ref, block_k)
    partners = None if span_ref is None else _partner_blocks(span_ref, block_k, num_k_blocks)

    def body(kb, carry, mask_causal: bool, mask_segments: bool = True):
        acc, m_prev, l_prev = carry
        k_slice = pl.ds(kb * block_k, block_k)
        # Raw scores; the scale is applied in the exponent's multiply-add (one pass over the tile, not two).
        scores = jnp.dot(q, k_ref[k_slice, :].T, preferred_element_type=jnp.float32)
        k_seg = None if kseg_ref is None or not mask_segments else kseg_ref[k_slice]
        mask = _visible(q_index, kb * block_k + jnp.arange(block_k), q_seg if mask_segments else None, k_seg,
                        mask_causal)
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1) * scale)
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row that has seen nothing yet stays at zero
        probs = jnp.exp2(scores * scale - m_safe[:, None])
        rescale = jnp.exp2(m_prev - m_safe)
        l_next = l_prev * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(probs.astype(v_ref.dtype), v_ref[k_slice, :],
                                               preferred_element_type=jnp.float32)
        return acc, m_next, l_next

    head_dim = q_ref.shape[-1]
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = _kv_loop(body, init, causal, q_start, q_offset, block_q, block_k, num_k_blocks, one_segment,
                         partners)
    seen = l > 0.0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), 0.0)


def _query_program_specs(q_len: int, kv_len: int, head_dim: int, group: int, block_q: int, with_segments: bool):
    """BlockSpecs of the kernels with one program per (query block, batch row, query head), the last query blocks
    (the heaviest under causal masking) first. Returns the index maps of a query block ([B, T, H, D] arrays) and of
    its rows ([B, H, T] arrays), the specs of (offset, q, K, V) and of the two segment-id rows (None without)."""
    num_q_blocks = q_len // block_q
    q_block = lambda i, b, h: (b, num_q_blocks - 1 - i, h, 0)  # noqa: E731
    row_block = lambda i, b, h: (b, h, num_q_blocks - 1 - i)  # noqa: E731
    whole_kv = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    inputs = [pl.BlockSpec((1,), lambda i, b, h: (0,)), pl.BlockSpec((None, block_q, None, head_dim), q_block),
              whole_kv, whole_kv]
    segments = [pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)) if with_segments else None,
                pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)) if with_segments else None]
    return q_block, row_block, inputs, segments


def _span_spec(num_q_blocks: int) -> pl.BlockSpec:
    """The BlockSpec of a query-block program's row of `_block_spans` (programs run the last query block first)."""
    return pl.BlockSpec((None, None, 4), lambda i, b, h: (b, num_q_blocks - 1 - i, 0))


def _forward(q, k, v, q_offset, q_seg, k_seg, *, causal: bool, blocks: FlashBlocks, interpret: bool):
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    block_q, block_k = blocks.block_q, blocks.block_k
    num_q_blocks = q_len // block_q
    kernel = functools.partial(_forward_kernel, scale=head_dim ** -0.5 * LOG2_E, causal=causal, block_q=block_q,
                               block_k=block_k, num_q_blocks=num_q_blocks)
    with_segments = q_seg is not None
    q_block, row_block, inputs, segments = _query_program_specs(q_len, kv_len, head_dim, group, block_q,
                                                                with_segments)
    spans = _block_spans(q_seg, k_seg, block_q) if with_segments else None
    out, lse = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, q_heads),
        in_specs=[*inputs, *segments, _span_spec(num_q_blocks) if with_segments else None],
        out_specs=[pl.BlockSpec((None, block_q, None, head_dim), q_block),
                   pl.BlockSpec((None, None, block_q), row_block)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, q_heads, q_len), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(blocks.warps, blocks.stages),
        interpret=interpret,
        name="smoljax_flash_forward",
    )(q_offset, q, k, v, q_seg, k_seg, spans)
    return out, lse


# --- backward ---------------------------------------------------------------------------------------------------

def _score_tile(q, k, lse, q_index, k_index, q_seg, k_seg, causal: bool, scale: float):
    """Recomputed probabilities [bq, bk] of one tile from the saved log-sum-exp (base 2)."""
    scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    mask = _visible(q_index, k_index, q_seg, k_seg, causal)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.exp2(scores - lse[:, None])


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, span_ref, dk_ref,
                dv_ref, *, scale: float, causal: bool, block_q: int, block_k: int, group: int):
    # One program: one (batch row, KV head, key block). It owns dK/dV of that block and sums over every query head
    # of the group and every query block that can see it, so no two programs write the same rows.
    k_block = pl.program_id(0)
    k_start = k_block * block_k
    q_offset = offset_ref[0]
    num_q_blocks = q_ref.shape[0] // block_q
    k = k_ref[...]
    v = v_ref[...]
    k_index = k_start + jnp.arange(block_k)
    k_seg = None if kseg_ref is None else kseg_ref[pl.ds(k_start, block_k)]
    num_q_blocks = jnp.int32(num_q_blocks)
    if causal:
        # Query blocks before first_q_block see none of these keys; those from unmasked_q_block on see all of them,
        # so only the blocks in between (the diagonal) pay for the causal compare.
        first_q_block = jnp.maximum(k_start - q_offset, 0) // block_q
        last_key_past_offset = jnp.maximum(k_start + block_k - 1 - q_offset, 0)
        unmasked_q_block = jnp.clip((last_key_past_offset + block_q - 1) // block_q, first_q_block, num_q_blocks)
    else:
        first_q_block = unmasked_q_block = jnp.int32(0)

    def steps(first_block, end_block, mask_causal: bool, mask_segments: bool = True):
        """The body over every (group head, query block in [first_block, end_block)) as one flat loop."""
        blocks_per_head = end_block - first_block

        def body(step, carry):
            dk, dv = carry
            # Truncating division (operands are never negative): no sign fix-up for Triton to lower.
            head = jax.lax.div(step, blocks_per_head)
            q_start = (first_block + jax.lax.rem(step, blocks_per_head)) * block_q
            q_slice = pl.ds(q_start, block_q)
            q = q_ref[q_slice, head, :]
            do = do_ref[q_slice, head, :]
            q_seg = None if qseg_ref is None or not mask_segments else qseg_ref[q_slice]
            probs = _score_tile(q, k, lse_ref[head, q_slice], q_offset + q_start + jnp.arange(block_q), k_index,
                                q_seg, k_seg if mask_segments else None, mask_causal, scale)
            dv = dv + jnp.dot(probs.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dprobs = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
            dscores = probs * (dprobs - delta_ref[head, q_slice][:, None])
            dk = dk + jnp.dot(dscores.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv
        return group * blocks_per_head, body

    head_dim = k_ref.shape[-1]
    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    carry = (zeros, zeros)
    # Query blocks wholly inside this key block's one segment skip the segment compare too.
    one_segment = None if span_ref is None else _whole_blocks_within(span_ref, block_q)
    end_q_block = num_q_blocks
    if span_ref is not None:  # only query blocks touching this key block's segment can see it
        partner_begin, partner_stop = _partner_blocks(span_ref, block_q, num_q_blocks)
        first_q_block = jnp.maximum(first_q_block, partner_begin)
        end_q_block = jnp.maximum(jnp.minimum(num_q_blocks, partner_stop), first_q_block)
        unmasked_q_block = jnp.clip(unmasked_q_block, first_q_block, end_q_block)
    for start, stop, mask_causal in ((first_q_block, unmasked_q_block, True), (unmasked_q_block, end_q_block, False)):
        if mask_causal and not causal:
            continue
        for begin, end, mask_segments in _segment_ranges(start, stop, one_segment):
            count, body = steps(begin, end, mask_causal=mask_causal, mask_segments=mask_segments)
            carry = jax.lax.fori_loop(0, count, body, carry)
    dk, dv = carry
    # Scores were scaled by scale (which folds in log2 e); the chain rule through exp2 multiplies by ln 2.
    dk_ref[...] = (dk * (scale / LOG2_E)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, span_ref, dq_ref, *,
               scale: float, causal: bool, block_q: int, block_k: int, num_q_blocks: int):
    q_block = num_q_blocks - 1 - pl.program_id(0)
    q_start = q_block * block_q
    q_offset = offset_ref[0]
    num_k_blocks = k_ref.shape[0] // block_k
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_index = q_offset + q_start + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[pl.ds(q_start, block_q)]

    def body(kb, dq, mask_causal: bool, mask_segments: bool = True):
        k_slice = pl.ds(kb * block_k, block_k)
        k = k_ref[k_slice, :]
        k_seg = None if kseg_ref is None or not mask_segments else kseg_ref[k_slice]
        probs = _score_tile(q, k, lse, q_index, kb * block_k + jnp.arange(block_k),
                            q_seg if mask_segments else None, k_seg, mask_causal, scale)
        dprobs = jnp.dot(do, v_ref[k_slice, :].T, preferred_element_type=jnp.float32)
        dscores = probs * (dprobs - delta[:, None])
        return dq + jnp.dot(dscores.astype(k.dtype), k, preferred_element_type=jnp.float32)

    one_segment = None if span_ref is None else _whole_blocks_within(span_ref, block_k)
    partners = None if span_ref is None else _partner_blocks(span_ref, block_k, num_k_blocks)
    dq = _kv_loop(body, jnp.zeros(q_ref.shape, jnp.float32), causal, q_start, q_offset, block_q, block_k,
                  num_k_blocks, one_segment, partners)
    dq_ref[...] = (dq * (scale / LOG2_E)).astype(dq_ref.dtype)


def _backward(q, k, v, q_offset, q_seg, k_seg, out, lse, d_out, *, causal: bool, blocks: FlashBlocks,
              interpret: bool):
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    block_q, block_k = blocks.dkv_block_q, blocks.dkv_block_k
    scale = head_dim ** -0.5 * LOG2_E
    # delta_i = sum_d dO_i * O_i, the softmax Jacobian's row term; a small XLA fusion.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    with_segments = q_seg is not None
    params = None if interpret else _compiler_params(blocks.bwd_warps, blocks.bwd_stages)
    # dK, dV: queries of the whole group, viewed [B, Tq, Hkv, G, D] so a program reads its group's heads.
    q_grouped = q.reshape(batch, q_len, kv_heads, group, head_dim)
    do_grouped = d_out.reshape(batch, q_len, kv_heads, group, head_dim)
    row_grouped = lambda a: a.reshape(batch, kv_heads, group, q_len)  # noqa: E731
    num_k_blocks = kv_len // block_k
    k_block = lambda j, b, h: (b, j, h, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k, group=group),
        grid=(num_k_blocks, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda j, b, h: (0,)),
            pl.BlockSpec((None, q_len, None, group, head_dim), lambda j, b, h: (b, 0, h, 0, 0)),
            pl.BlockSpec((None, block_k, None, head_dim), k_block),
            pl.BlockSpec((None, block_k, None, head_dim), k_block),
            pl.BlockSpec((None, q_len, None, group, head_dim), lambda j, b, h: (b, 0, h, 0, 0)),
            pl.BlockSpec((None, None, group, q_len), lambda j, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, group, q_len), lambda j, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)) if with_segments else None,
            pl.BlockSpec((None, kv_len), lambda j, b, h: (b, 0)) if with_segments else None,
            pl.BlockSpec((None, None, 4), lambda j, b, h: (b, j, 0)) if with_segments else None,
        ],
        out_specs=[pl.BlockSpec((None, block_k, None, head_dim), k_block),
                   pl.BlockSpec((None, block_k, None, head_dim), k_block)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="smoljax_flash_backward_dkv",
    )(q_offset, q_grouped, k, v, do_grouped, row_grouped(lse), row_grouped(delta), q_seg, k_seg,
      _block_spans(k_seg, q_seg, block_k) if with_segments else None)

    block_q, block_k = blocks.dq_block_q, blocks.dq_block_k
    num_q_blocks = q_len // block_q
    q_block, row_block, inputs, segments = _query_program_specs(q_len, kv_len, head_dim, group, block_q,
                                                                with_segments)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k,
                          num_q_blocks=num_q_blocks),
        grid=(num_q_blocks, batch, q_heads),
        in_specs=[*inputs, pl.BlockSpec((None, block_q, None, head_dim), q_block),
                  pl.BlockSpec((None, None, block_q), row_block), pl.BlockSpec((None, None, block_q), row_block),
                  *segments, _span_spec(num_q_blocks) if with_segments else None],
        out_specs=pl.BlockSpec((None, block_q, None, head_dim), q_block),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="smoljax_flash_backward_dq",
    )(q_offset, q, k, v, d_out, lse, delta, q_seg, k_seg,
      _block_spans(q_seg, k_seg, block_q) if with_segments else None)
    return dq, dk, dv


# --- the differentiable kernel ----------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, q_offset, q_seg, k_seg, causal, blocks, interpret):
    return _forward(q, k, v, q_offset, q_seg, k_seg, causal=causal, blocks=blocks, interpret=interpret)[0]


def _flash_fwd(q, k, v, q_offset, q_seg, k_seg, causal, blocks, interpret):
    out, lse = _forward(q, k, v, q_offset, q_seg, k_seg, causal=causal, blocks=blocks, interpret=interpret)
    return out, (q, k, v, q_offset, q_seg, k_seg, out, lse)


def _flash_bwd(causal, blocks, interpret, residuals, d_out):
    q, k, v, q_offset, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_offset, q_seg, k_seg, out, lse, d_out, causal=causal, blocks=blocks,
                           interpret=interpret)
    no_grad = lambda a: None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return dq, dk, dv, no_grad(q_offset), no_grad(q_seg), no_grad(k_seg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_rows(x: jax.Array, length: int) -> jax.Array:
    """Pads axis 1 (the sequence) with zeros up to `length`."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segments: jax.Array | None = None,
                    kv_segments: jax.Array | None = None, causal: bool = True, q_offset: jax.Array | int = 0,
                    blocks: FlashBlocks = DEFAULT_BLOCKS, interpret: bool = False) -> jax.Array:
    """Flash attention (Pallas, Triton backend), differentiable in q, k and v.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq a multiple of Hkv; q_segments [B, Tq] and kv_segments [B, Tk]
    int (both or neither); q_offset: key index of the first query (an int or a traced scalar). Returns
    [B, Tq, Hq, D] in q's dtype. Any Tq and Tk: the wrapper pads to whole tiles with segment 0 and slices.
    `interpret=True` runs the same kernels in the Pallas interpreter (any backend, for tests).
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    if (q_segments is None) != (kv_segments is None):
        raise ValueError("give both q_segments and kv_segments, or neither")
    tile_q = max(blocks.block_q, blocks.dkv_block_q, blocks.dq_block_q)
    tile_k = max(blocks.block_k, blocks.dkv_block_k, blocks.dq_block_k)
    padded_q, padded_k = -(-q_len // tile_q) * tile_q, -(-kv_len // tile_k) * tile_k
    if q_segments is None and (padded_k != kv_len and not causal):
        # Tail keys must be masked, and only segment ids can say so.
        q_segments, kv_segments = jnp.ones((batch, q_len), jnp.int32), jnp.ones((batch, kv_len), jnp.int32)
    if q_segments is not None:
        q_segments = _pad_rows(q_segments.astype(jnp.int32), padded_q)
        kv_segments = _pad_rows(kv_segments.astype(jnp.int32), padded_k)
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    out = _flash(_pad_rows(q, padded_q), _pad_rows(k, padded_k), _pad_rows(v, padded_k), offset, q_segments,
                 kv_segments, causal, blocks, interpret)
    return out[:, :q_len]
