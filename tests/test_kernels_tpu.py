"""TPU attention kernels against the XLA reference, on the CPU in Pallas interpret mode.

Splash (flash_attention_tpu) runs in the HLO interpreter with the batch vmapped, and once in the TPU interpreter;
the decode kernel runs in the TPU interpreter, which simulates the DMAs its index maps ask for and fills unwritten
memory with NaN. Shapes are small (interpretation is slow) but odd: lengths that are not tile multiples, GQA with
SmolLM2's 9 query / 3 kv heads of 64, packed segments and padding. f32 agrees within 1e-5, bf16 within 2e-2.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from smoljax.attention import attention_mask, xla_attention
from smoljax.kernels import tpu_attention
from smoljax.kernels.tpu_attention import decode_attention_tpu, flash_attention_tpu

F32_TOL = 1e-5
BF16_TOL = 2e-2


def _qkv(key, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype, decode=False):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    q_shape = (batch, q_heads, head_dim) if decode else (batch, q_len, q_heads, head_dim)
    q = jax.random.normal(kq, q_shape, jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def _self_reference(q, k, v, segments, causal):
    """xla_attention with the segment mask of self-attention (positions = index in the row)."""
    batch, length = q.shape[:2]
    if segments is None:
        segments = jnp.ones((batch, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return xla_attention(q, k, v, attention_mask(segments, segments, positions, positions, causal))


def _decode_reference(q, k, v, segments, start, end):
    """xla_attention of one query per row over the cache slots [start, end) with a nonzero segment."""
    slots = jnp.arange(k.shape[1])
    live = (slots >= start[:, None]) & (slots < end[:, None]) & (segments != 0)
    return xla_attention(q[:, None], k, v, live[:, None, :])[:, 0]


def _both(kernel, reference, *args):
    """Kernel and reference outputs from one jit (one compilation: interpreted kernels compile slowly)."""
    return jax.jit(lambda *a: (kernel(*a), reference(*a)))(*args)


def _close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol)


def _packed_segments():
    """Row 0: two packed documents then right padding; row 1: left padding then one document (T = 37)."""
    return jnp.array([[1] * 20 + [2] * 10 + [0] * 7, [0] * 5 + [3] * 32], jnp.int32)


def _flash_and_grads(q, k, v, weights, **kwargs):
    """Output and d(sum(out * weights))/d(q, k, v), for the kernel and for the reference, in one jit."""
    segments = kwargs.get("q_segments")

    def both(q, k, v):
        ours, ours_vjp = jax.vjp(lambda *a: flash_attention_tpu(*a, **kwargs), q, k, v)
        ref, ref_vjp = jax.vjp(lambda *a: _self_reference(*a, segments, kwargs["causal"]), q, k, v)
        return ours, ours_vjp(weights), ref, ref_vjp(weights)

    return jax.jit(both)(q, k, v)


# ---------------------------------------------------------------------------------------------- flash (splash)

def test_flash_gqa_packed_causal_f32_matches_reference_and_gradients():
    q, k, v = _qkv(0, 2, 37, 37, 9, 3, 64, jnp.float32)
    segments = _packed_segments()
    weights = jax.random.normal(jax.random.key(1), q.shape)
    ours, ours_grads, ref, ref_grads = _flash_and_grads(
        q, k, v, weights, q_segments=segments, kv_segments=segments, causal=True, interpret=True)
    _close(ours, ref, F32_TOL)
    for got, want in zip(ours_grads, ref_grads):
        _close(got, want, F32_TOL)
    padding = np.asarray(segments == 0)
    assert np.all(np.asarray(ours)[padding] == 0)  # padding queries read zeros...
    assert np.all(np.asarray(ours_grads[0])[padding] == 0)  # ...and pass no gradient back
    assert np.all(np.asarray(ours_grads[1])[padding] == 0)  # padding keys are never attended to


def test_flash_bidirectional_mha_f32_padded_length_and_gradients():
    # T = 130 pads to 256 with segment 0, which bidirectional attention must mask without any segments given.
    q, k, v = _qkv(2, 1, 130, 130, 2, 2, 64, jnp.float32)
    weights = jax.random.normal(jax.random.key(3), q.shape)
    ours, ours_grads, ref, ref_grads = _flash_and_grads(q, k, v, weights, causal=False, interpret=True)
    _close(ours, ref, F32_TOL)
    for got, want in zip(ours_grads, ref_grads):
        _close(got, want, F32_TOL)


@pytest.mark.parametrize("length, block", [(1, None), (130, 128)])
def test_flash_gqa_causal_bf16_without_segments(length, block):
    # T = 130 in 128-tiles: 2 x 2 tiles, the one above the diagonal skipped by splash's block-sparse mask.
    q, k, v = _qkv(4, 2, length, length, 9, 3, 64, jnp.bfloat16)
    ours, ref = _both(lambda q, k, v: flash_attention_tpu(q, k, v, block_sizes=block, interpret=True),
                      lambda q, k, v: _self_reference(q, k, v, None, True), q, k, v)
    assert ours.dtype == jnp.bfloat16 and ours.shape == q.shape
    _close(ours, ref, BF16_TOL)


def test_flash_bidirectional_packed_in_tpu_interpreter():
    # SigLIP-style bidirectional MHA with packed segments, in the TPU interpreter (batch as a loop, not vmap).
    q, k, v = _qkv(5, 2, 37, 37, 2, 2, 64, jnp.float32)
    segments = _packed_segments()
    ours, ref = _both(lambda q, k, v: flash_attention_tpu(q, k, v, q_segments=segments, kv_segments=segments,
                                                           causal=False, interpret=pltpu.InterpretParams()),
                      lambda q, k, v: _self_reference(q, k, v, segments, False), q, k, v)
    _close(ours, ref, F32_TOL)


def test_flash_visibility_when_query_and_key_segments_differ():
    # Row 0: query segment 2 appears among the keys only after the query (causal: nothing visible); row 1: the
    # query's segment is absent from the keys. The splash kernel itself is not needed to check this helper.
    q_seg = jnp.array([[1, 2, 2, 0], [5, 1, 1, 1]], jnp.int32)
    kv_seg = jnp.array([[1, 1, 2, 2], [1, 1, 1, 1]], jnp.int32)
    causal, full = jax.jit(lambda q, k: (tpu_attention._has_visible_key(q, k, causal=True),
                                         tpu_attention._has_visible_key(q, k, causal=False)))(q_seg, kv_seg)
    expected_causal = [[True, False, True, False], [False, True, True, True]]
    expected_full = [[True, True, True, False], [False, True, True, True]]
    assert np.asarray(causal).tolist() == expected_causal
    assert np.asarray(full).tolist() == expected_full
    positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
    assert np.array_equal(causal, np.asarray(attention_mask(q_seg, kv_seg, positions, positions, True)).any(-1))


def test_flash_runs_the_kernel_not_a_fallback():
    q, k, v = _qkv(6, 1, 8, 8, 2, 1, 64, jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: flash_attention_tpu(q, k, v, interpret=True))(q, k, v))
    assert "pallas_call" in jaxpr and "interpret=True" in jaxpr
    if jax.default_backend() == "cpu":  # compiled Mosaic cannot run here, and nothing falls back to XLA
        with pytest.raises(Exception, match="interpret"):
            jax.jit(lambda q, k, v: flash_attention_tpu(q, k, v)).lower(q, k, v)


@pytest.mark.parametrize("kwargs, message", [
    (dict(q_shape=(1, 8, 4, 64), kv_shape=(1, 8, 3, 64)), "multiple of kv heads"),
    (dict(q_shape=(1, 8, 3, 64), kv_shape=(1, 9, 3, 64)), "Tq .8. must equal Tk .9."),
    (dict(q_shape=(1, 8, 3, 64), kv_shape=(1, 8, 3, 64), block_sizes=100), "multiple of 128"),
    (dict(q_shape=(1, 8, 3, 64), kv_shape=(1, 8, 3, 64), q_segments=jnp.ones((1, 8), jnp.int32)), "both"),
])
def test_flash_rejects_bad_arguments(kwargs, message):
    q = jnp.zeros(kwargs.pop("q_shape"))
    k = jnp.zeros(kwargs.pop("kv_shape"))
    with pytest.raises(ValueError, match=message):
        flash_attention_tpu(q, k, k, interpret=True, **kwargs)


# ---------------------------------------------------------------------------------------------- decode

def _ragged_cache(length):
    """Per row (start, end) and segments: full range with segment-0 holes; left padding; empty (start == end);
    only the first block live."""
    start = jnp.array([0, 100, 150, 3], jnp.int32)
    end = jnp.array([length - 10, length - 10, 150, 40], jnp.int32)
    segments = jnp.ones((4, length), jnp.int32).at[0, :10].set(0).at[0, 50:60].set(0).at[1, :100].set(0)
    return start, end, segments


def test_decode_gqa_ragged_f32():
    # S = 300: three blocks of 128 (the last one partial: reads past the cache are masked) in two splits of two
    # blocks, so the online softmax runs across blocks and the split merge across splits.
    length = 300
    q, k, v = _qkv(7, 4, 1, length, 9, 3, 64, jnp.float32, decode=True)
    start, end, segments = _ragged_cache(length)
    # Slots at or after `end` are not written yet: garbage there (NaN here) must not leak into the result.
    unwritten = (jnp.arange(length)[None, :] >= end[:, None])[:, :, None, None]
    k_dirty, v_dirty = jnp.where(unwritten, jnp.nan, k), jnp.where(unwritten, jnp.nan, v)
    ours, ref = _both(lambda q, k, v, k_dirty, v_dirty: (
        decode_attention_tpu(q, k_dirty, v_dirty, segments, start, end, num_splits=2, interpret=True)),
        lambda q, k, v, *_: _decode_reference(q, k, v, segments, start, end), q, k, v, k_dirty, v_dirty)
    _close(ours, ref, F32_TOL)
    assert np.all(np.asarray(ours[2]) == 0)  # kv_start == kv_end: nothing visible, zeros


def test_decode_mha_bf16_short_cache():
    # S = 37 < block_k: the whole cache is one block; SigLIP-like MHA (no grouping).
    length = 37
    q, k, v = _qkv(8, 2, 1, length, 4, 4, 64, jnp.bfloat16, decode=True)
    start, end = jnp.array([0, 7], jnp.int32), jnp.array([37, 30], jnp.int32)
    segments = jnp.ones((2, length), jnp.int32).at[0, 5].set(0)
    ours, ref = _both(lambda q, k, v: decode_attention_tpu(q, k, v, segments, start, end, interpret=True),
                      lambda q, k, v: _decode_reference(q, k, v, segments, start, end), q, k, v)
    assert ours.dtype == jnp.bfloat16 and ours.shape == q.shape
    _close(ours, ref, BF16_TOL)


def test_decode_index_map_issues_no_dma_for_skipped_blocks():
    # 8 blocks of 128 in 3 splits of 3 steps; live slots [300, 700) are blocks 2..5. The block index the K/V specs
    # ask for may only change when a live block starts, so skipped steps reuse the buffer already in VMEM.
    start, end = np.array([300, 0]), np.array([700, 0])
    block_of = lambda row, split, step: int(tpu_attention._live_block(
        row, split, step, start, end, block=128, per_split=3, num_blocks=8))
    visited = [block_of(0, s, j) for s in range(3) for j in range(3)]
    assert visited == [2, 2, 2, 3, 4, 5, 5, 5, 5]
    assert {block_of(1, s, j) for s in range(3) for j in range(3)} == {0}  # empty row: one block, fetched once


def test_decode_runs_the_kernel_in_the_tpu_interpreter():
    q, k, v = _qkv(9, 1, 1, 16, 2, 1, 64, jnp.float32, decode=True)
    segments, start, end = jnp.ones((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.full((1,), 16)
    jaxpr = str(jax.make_jaxpr(lambda *a: decode_attention_tpu(*a, interpret=True))(q, k, v, segments, start, end))
    assert "pallas_call" in jaxpr and "InterpretParams" in jaxpr


@pytest.mark.parametrize("shapes, message", [
    (((1, 4, 64), (1, 16, 3, 64), (1, 16), (1,)), "multiple of kv heads"),
    (((1, 3, 64), (1, 16, 3, 32), (1, 16), (1,)), "head_dim"),
    (((1, 3, 64), (1, 16, 3, 64), (1, 15), (1,)), "kv_segments"),
    (((1, 3, 64), (1, 16, 3, 64), (1, 16), (2,)), "kv_start"),
])
def test_decode_rejects_bad_shapes(shapes, message):
    q_shape, kv_shape, seg_shape, range_shape = shapes
    k, bounds = jnp.zeros(kv_shape), jnp.zeros(range_shape, jnp.int32)
    with pytest.raises(ValueError, match=message):
        decode_attention_tpu(jnp.zeros(q_shape), k, k, jnp.ones(seg_shape, jnp.int32), bounds, bounds, interpret=True)
