"""The Pallas GPU kernels (flash attention, decode attention) against the XLA reference, run in the Pallas
interpreter on the CPU; `tests/test_gpu.py` runs the same comparisons natively on a GPU, and this module passes on a
GPU too (the fused decode layers then run natively).

Small tiles (16) make short sequences span several tiles, so the causal bounds, tile tails, the split-K merge and the
skipped blocks are all exercised at sizes the interpreter runs quickly.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smoljax import generation
from smoljax.attention import (GPU_AUTO, KINDS, attention_kind, attention_mask, resolve_implementation,
                               xla_attention)
from smoljax.config import LlamaConfig
from smoljax.errors import InputError
from smoljax import nn
from smoljax.kernels.decode_attention import (UNROLLED_MERGE_MAX_SPLITS, append_and_attend,
                                            append_and_attend_reference, choose_splits, decode_attention,
                                            merge_splits)
from smoljax.kernels.flash_attention import FlashBlocks, flash_attention
from smoljax.models import smollm2
from smoljax.params import llama_specs

SMALL = FlashBlocks(block_q=16, block_k=16, dkv_block_q=16, dkv_block_k=16, dq_block_q=16, dq_block_k=16)
# Unequal backward tiles: the dK/dV kernel steps over queries in blocks smaller than its keys, dQ the other way.
UNEVEN = FlashBlocks(block_q=16, block_k=16, dkv_block_q=8, dkv_block_k=32, dq_block_q=32, dq_block_k=8)
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def full_f32_products():
    """f32 products at full precision on every backend: on a GPU, where this module also runs natively, XLA would
    otherwise multiply f32 as TF32, kernels and references alike, far outside the f32 tolerances."""
    with jax.default_matmul_precision("highest"):
        yield


def _random(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype, seed=0):
    return (_random((batch, q_len, q_heads, head_dim), dtype, seed),
            _random((batch, kv_len, kv_heads, head_dim), dtype, seed + 1),
            _random((batch, kv_len, kv_heads, head_dim), dtype, seed + 2))


def _packed_segments(batch, length):
    """Row 0: three documents; row 1: one document then padding (segment 0); row 2: all padding."""
    segments = np.zeros((batch, length), np.int32)
    segments[0, : length // 3], segments[0, length // 3: length - 5], segments[0, length - 5:] = 1, 2, 3
    if batch > 1:
        segments[1, : length - 7] = 1
    return jnp.asarray(segments)


def _reference(q, k, v, q_seg, kv_seg, causal, q_offset=0):
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if q_seg is None:
        q_seg, kv_seg = jnp.ones((batch, q_len), jnp.int32), jnp.ones((batch, kv_len), jnp.int32)
    q_pos = jnp.broadcast_to(q_offset + jnp.arange(q_len), (batch, q_len))
    kv_pos = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    return xla_attention(q, k, v, attention_mask(q_seg, kv_seg, q_pos, kv_pos, causal))


def _close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal, packed", [(True, False), (True, True), (False, True), (False, False)])
def test_flash_forward_matches_reference(causal, packed, dtype):
    """Odd length (37: a partial tail tile), GQA 6/2, packed rows, a padded row and an all-padding row."""
    q, k, v = _qkv(3, 37, 37, 6, 2, 16, dtype)
    segments = _packed_segments(3, 37) if packed else None
    out = flash_attention(q, k, v, q_segments=segments, kv_segments=segments, causal=causal, blocks=SMALL,
                          interpret=True)
    expected = _reference(q, k, v, segments, segments, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, expected, dtype)
    if packed:
        assert not np.any(np.asarray(out[2], np.float32)), "an all-padding row must give zeros"


@pytest.mark.parametrize("blocks", [SMALL, UNEVEN], ids=["even", "uneven"])
@pytest.mark.parametrize("causal, packed, heads, offset", [(True, True, (6, 2), 0), (True, False, (4, 4), 0),
                                                           (False, True, (6, 3), 0), (True, True, (6, 2), 13)])
def test_flash_gradients_match_reference(causal, packed, heads, offset, blocks):
    """Gradients of q, k and v; with an offset the queries are the last 45 of 58 keys (the diagonal blocks of the
    dK/dV kernel then start mid-block)."""
    q, k, v = _qkv(2, 45, 45 + offset, *heads, 16, jnp.float32, seed=3)
    kv_segments = _packed_segments(2, 45 + offset) if packed else None
    segments = None if kv_segments is None else kv_segments[:, offset:]
    weights = _random(q.shape, jnp.float32, 9)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    flash = loss(lambda q, k, v: flash_attention(q, k, v, q_segments=segments, kv_segments=kv_segments,
                                                 causal=causal, q_offset=offset, blocks=blocks, interpret=True))
    reference = loss(lambda q, k, v: _reference(q, k, v, segments, kv_segments, causal, q_offset=offset))
    for actual, expected in zip(jax.grad(flash, (0, 1, 2))(q, k, v), jax.grad(reference, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(actual, expected, atol=5e-5, rtol=5e-5)


@pytest.fixture
def verified_triton_lowering(monkeypatch):
    """Lowers Pallas kernels to Triton IR on any host and runs the MLIR verifier on each module, as XLA does when it
    compiles them on a GPU. Returns the list of modules verified (filled as they lower). Uses JAX's private Triton
    lowering module; skipped where that has moved."""
    try:
        from jax._src.pallas.triton import lowering, pallas_call_registration
    except ImportError:
        pytest.skip("this JAX has no Pallas Triton lowering module to hook")
    verified = []
    lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()
        verified.append(result.module)
        return result

    monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified


@pytest.mark.parametrize("heads", [(9, 3), (12, 12)])
@pytest.mark.parametrize("causal, packed, length", [(c, p, t) for c in (True, False) for p in (True, False)
                                                    for t in (128, 100)])
def test_flash_kernels_pass_the_triton_verifier(verified_triton_lowering, causal, packed, length, heads):
    """Each variant of the forward and both backward kernels lowers to Triton IR that verifies, checked without a
    GPU: the interpreter runs the same jaxpr but not the Triton lowering, and the bidirectional backward without
    segment ids once lowered to an ill-typed select that only the GPU compile rejected."""
    q = jax.ShapeDtypeStruct((2, length, heads[0], 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, length, heads[1], 64), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((2, length), jnp.int32)

    def loss(q, k, v, segments):
        ids = dict(q_segments=segments, kv_segments=segments) if packed else {}
        return jnp.sum(flash_attention(q, k, v, causal=causal, **ids).astype(jnp.float32))

    jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv, segments).lower(lowering_platforms=("cuda",))
    assert len(verified_triton_lowering) == 3  # forward, dK/dV, dQ


@pytest.mark.parametrize("batch, slots", [(1, 2304), (3, 100)])
def test_decode_kernel_passes_the_triton_verifier(verified_triton_lowering, batch, slots):
    q = jax.ShapeDtypeStruct((batch, 9, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((batch, slots, 3, 64), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    segments = jax.ShapeDtypeStruct((batch, slots), jnp.int32)
    jax.jit(decode_attention).trace(q, cache, cache, segments, rows, rows).lower(lowering_platforms=("cuda",))
    assert len(verified_triton_lowering) == 1


@pytest.mark.parametrize("batch, splits, q_heads, kv_heads", [(1, None, 9, 3), (1, 1, 9, 3), (64, None, 9, 3),
                                                              (1, None, 32, 32), (1, None, 15, 5)])
def test_decode_with_cache_write_passes_the_triton_verifier(verified_triton_lowering, batch, splits, q_heads,
                                                            kv_heads):
    qkv = jax.ShapeDtypeStruct((batch, q_heads + 2 * kv_heads, 64), jnp.bfloat16)
    rope = jax.ShapeDtypeStruct((batch, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((batch, 320, kv_heads, 64), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    segments = jax.ShapeDtypeStruct((batch, 320), jnp.int32)
    step = functools.partial(append_and_attend, q_heads=q_heads, num_splits=splits)
    jax.jit(step).trace(qkv, rope, rope, cache, cache, segments, rows, rows).lower(lowering_platforms=("cuda",))
    assert len(verified_triton_lowering) == 1


def test_flash_with_query_offset_is_a_prefill_into_a_cache():
    """Queries written at slot 8 of a 64-slot cache whose first 3 slots of row 1 are left padding and whose slots
    after the new tokens are empty: the offset kernel equals the reference over the whole cache."""
    batch, new, slots, offset = 2, 21, 64, 8
    q, k, v = _qkv(batch, new, slots, 6, 2, 16, jnp.float32, seed=5)
    kv_seg = np.zeros((batch, slots), np.int32)
    kv_seg[0, : offset + new] = 1
    kv_seg[1, 3: offset + new] = 1
    q_seg = jnp.ones((batch, new), jnp.int32)
    out = flash_attention(q, k, v, q_segments=q_seg, kv_segments=jnp.asarray(kv_seg), causal=True,
                          q_offset=jnp.asarray(offset), blocks=SMALL, interpret=True)
    _close(out, _reference(q, k, v, q_seg, jnp.asarray(kv_seg), True, q_offset=offset), jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_with_a_hole_in_the_keys_never_attends_to_it(causal):
    """Forward and gradients. The kernels skip the segment compare between blocks that lie wholly in one segment's
    span; a segment whose positions are split by a hole (segment 0, or another segment between) has no span, and the
    hole must stay invisible. Row 0: segment 1, a hole, segment 1 again; row 1: 1, then 2, then 1; row 2: one run."""
    batch, length = 3, 80
    q, k, v = _qkv(batch, length, length, 6, 2, 16, jnp.float32, seed=8)
    kv_seg = np.ones((batch, length), np.int32)
    kv_seg[0, 20:45] = 0
    kv_seg[1, 30:50] = 2
    q_seg = jnp.asarray(kv_seg)
    _assert_outputs_and_gradients_match(q, k, v, q_seg, q_seg, causal, weight_seed=4)


def _assert_outputs_and_gradients_match(q, k, v, q_seg, kv_seg, causal, weight_seed):
    """The flash kernels (uneven tiles, interpreted) against the reference: outputs and the gradients of a random
    weighting of them."""
    weights = _random(q.shape, jnp.float32, weight_seed)

    def outputs_and_grads(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v) * weights)  # noqa: E731
        return attend(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)

    got = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, q_segments=q_seg, kv_segments=kv_seg,
                                                            causal=causal, blocks=UNEVEN, interpret=True))
    want = outputs_and_grads(lambda q, k, v: _reference(q, k, v, q_seg, kv_seg, causal))
    for actual, expected in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(actual, expected, atol=5e-5, rtol=5e-5)


def test_block_spans_say_which_blocks_can_see_anything():
    """The per-block summary the kernels skip work by: a one-segment block lists where its segment lies along the
    other axis, an all-padding block says that nothing is visible, a mixed block promises nothing."""
    from smoljax.kernels.flash_attention import _block_spans

    own = jnp.asarray([[0] * 4 + [0, 0, 1, 1] + [1] * 4 + [2] * 4])  # blocks of 4: padding, mixed, 1, 2
    other = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(_block_spans(own, other, 4)[0],
                                  [[0, 0, 0, 1], [0, 0, 0, 0], [1, 3, 9, 0], [2, 9, 12, 0]])


def test_flash_skips_nothing_it_must_see_in_left_padded_prefill_rows():
    """Bucketed prompts: rows left-padded by 0, 5, 16 and 40 of 48 slots (whole padding blocks, a block half
    padding), queries at slot 0 of a 64-slot cache. Outputs and gradients against the reference."""
    batch, new, slots = 4, 48, 64
    q, k, v = _qkv(batch, new, slots, 6, 2, 16, jnp.float32, seed=11)
    kv_seg = np.zeros((batch, slots), np.int32)
    for row, pad in enumerate((0, 5, 16, 40)):
        kv_seg[row, pad:new] = 1
    kv_seg = jnp.asarray(kv_seg)
    _assert_outputs_and_gradients_match(q, k, v, kv_seg[:, :new], kv_seg, True, weight_seed=12)


def _cache_case(batch, slots, seed=0):
    """Segments and live ranges of a ragged cache: left padding, a hole of empty slots, an empty row."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, slots // 2, batch)
    end = np.minimum(start + rng.integers(1, slots, batch), slots)
    start[-1] = end[-1] = slots // 3  # nothing live
    segments = np.zeros((batch, slots), np.int32)
    for row in range(batch):
        segments[row, start[row]: end[row]] = 1
    segments[0, start[0] + 1: start[0] + 3] = 0
    return jnp.asarray(segments), jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slots, splits", [(80, None), (80, 1), (83, 3)])
def test_decode_matches_reference(slots, splits, dtype):
    """Ragged rows, a masked hole, an all-empty row (zeros), GQA 9/3, one or several splits, and a cache length
    that is not a whole number of blocks (83)."""
    batch = 4
    q = _random((batch, 9, 64), dtype, 1)
    k, v = _random((batch, slots, 3, 64), dtype, 2), _random((batch, slots, 3, 64), dtype, 3)
    segments, start, end = _cache_case(batch, slots)
    out = decode_attention(q, k, v, segments, start, end, block_k=16, num_splits=splits, interpret=True)
    expected = xla_attention(q[:, None], k, v, (segments != 0)[:, None, :])[:, 0]
    _close(out, expected, dtype)
    assert not np.any(np.asarray(out[-1], np.float32))


def test_decode_reads_only_live_slots():
    """Blocks outside [start, end) are skipped, not masked: NaNs planted there never reach the output."""
    q = _random((2, 4, 16), jnp.float32, 0)
    k, v = _random((2, 64, 2, 16), jnp.float32, 1), _random((2, 64, 2, 16), jnp.float32, 2)
    start, end = jnp.asarray([16, 32]), jnp.asarray([48, 40])
    segments = jnp.asarray((np.arange(64)[None] >= np.asarray(start)[:, None])
                           & (np.arange(64)[None] < np.asarray(end)[:, None]), jnp.int32)
    poisoned = jnp.where(segments[:, :, None, None] != 0, k, jnp.nan)
    outside_blocks = (np.arange(64) // 16 < 1) | (np.arange(64) // 16 >= 3)
    poisoned = jnp.where(jnp.asarray(outside_blocks)[None, :, None, None], poisoned, k)
    out = decode_attention(q, poisoned, v, segments, start, end, block_k=16, num_splits=2, interpret=True)
    assert np.all(np.isfinite(np.asarray(out)))
    expected = xla_attention(q[:, None], k, v, (segments != 0)[:, None, :])[:, 0]
    _close(out, expected, jnp.float32)


def _append_case(batch, slots, slot, dtype, seed=0, q_heads=9, kv_heads=3):
    """A decode step's q/k/v heads (head_dim 16), RoPE tables for each row's position and a cache with garbage in
    its unwritten slots. Row 0 has a hole, the middle rows left padding, and the last row nothing live at all: no
    cached slot, and a new token in segment 0 (its key is written but never attended to)."""
    rng = np.random.default_rng(seed)
    qkv = _random((batch, q_heads + 2 * kv_heads, 16), dtype, seed)
    cos, sin = nn.rope_cos_sin(jnp.asarray(rng.integers(0, 90, (batch, 1))), 16, 100000.0, dtype)
    k, v = (_random((batch, slots, kv_heads, 16), dtype, seed + i) for i in (1, 2))
    start = np.minimum(np.arange(batch) * 7, slot)
    start[-1] = slot
    segments = (np.arange(slots)[None] >= start[:, None]) & (np.arange(slots)[None] <= slot)
    segments[0, 2:5] = False
    segments[-1, slot] = False
    return (qkv, cos[:, 0], sin[:, 0], k, v, jnp.asarray(segments, jnp.int32), jnp.asarray(start, jnp.int32),
            jnp.full((batch,), slot + 1, jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slot, splits", [(37, None), (37, 1), (47, 2), (48, 3), (0, None)])
def test_decode_with_rope_and_cache_write_matches_reference(slot, splits, dtype):
    """RoPE, the cache write and split-K attention in one kernel against RoPE, dynamic-update-slice and the XLA
    attention: outputs and both updated caches. Slot 47 ends a 16-slot block and 48 starts one (the new key is the
    owner split's only key); slot 0 is a first token with nothing cached."""
    case = _append_case(4, 80, slot, dtype)
    got = append_and_attend(*case, q_heads=9, block_k=16, num_splits=splits, interpret=True)
    want = append_and_attend_reference(*case, q_heads=9)
    for actual, expected in zip(got, want):
        _close(actual, expected, dtype)
    assert not np.any(np.asarray(got[0][-1], np.float32))


@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (15, 5)], ids=["group1", "group3-5kv"])
def test_decode_with_cache_write_at_the_family_s_other_head_layouts(q_heads, kv_heads):
    """SmolLM2-1.7B's one query head per KV head, and SmolLM2-360M / SmolVLM2's 15 over 5."""
    case = _append_case(3, 64, 40, jnp.float32, q_heads=q_heads, kv_heads=kv_heads)
    got = append_and_attend(*case, q_heads=q_heads, block_k=16, interpret=True)
    want = append_and_attend_reference(*case, q_heads=q_heads)
    for actual, expected in zip(got, want):
        _close(actual, expected, jnp.float32)


@pytest.mark.parametrize("splits", [3, UNROLLED_MERGE_MAX_SPLITS + 4])
def test_merging_splits_is_one_softmax_over_all_their_keys(splits):
    """Both forms of the merge (split by split for few splits, reductions for many) against a softmax over every
    split's scores at once; an empty split weighs nothing, and a head with nothing live anywhere gives zeros."""
    rng = np.random.default_rng(splits)
    scores = rng.standard_normal((2, splits, 3, 5)) * 4  # [batch, split, head, keys of the split]
    values = rng.standard_normal((2, splits, 5, 8))
    scores[0, 1] = -np.inf  # an empty split
    scores[1, :, 2] = -np.inf  # head 2 of row 1 sees nothing
    m = scores.max(-1) * np.log2(np.e)  # base 2, as the kernels keep it
    probs = np.exp2(scores * np.log2(np.e) - np.where(np.isinf(m), 0, m)[..., None])
    acc = np.einsum("bshk,bskd->bshd", probs, values)
    merged = merge_splits(jnp.asarray(acc, jnp.float32), jnp.asarray(m, jnp.float32),
                          jnp.asarray(probs.sum(-1), jnp.float32))
    flat = np.moveaxis(scores, 1, 2).reshape(2, 3, splits * 5)
    with np.errstate(invalid="ignore"):
        weights = np.exp(flat - flat.max(-1, keepdims=True))
        expected = np.einsum("bhk,bkd->bhd", weights / weights.sum(-1, keepdims=True), values.reshape(2, -1, 8))
    expected[1, 2] = 0.0
    np.testing.assert_allclose(np.asarray(merged), expected, atol=1e-5, rtol=1e-5)


def test_decode_splits_fill_the_gpu_but_never_exceed_the_blocks():
    assert choose_splits(1, 3, 4) == 4
    assert choose_splits(1, 3, 1000) == 88
    assert choose_splits(64, 3, 100) == 1


TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny_params():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32),
                        llama_specs(TINY), is_leaf=lambda x: hasattr(x, "axes"))


def test_model_forward_through_the_pallas_dispatch(tiny_params):
    """`attn_impl='pallas'` (interpreted on the CPU) gives the XLA logits for packed rows with padding."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 96, (2, 40)), jnp.int32)
    segments = _packed_segments(2, 40)
    logits = {impl: smollm2.forward(tiny_params, tokens, TINY, segment_ids=segments, attn_impl=impl)
              for impl in ("xla", "pallas")}
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_generation_through_the_pallas_kernels(tiny_params, unroll, monkeypatch):
    """Prefill (flash with a query offset) and decode on a ragged batch: the greedy tokens of the XLA path. The layer
    scan decodes through the split-K kernel; unrolled layers (per-layer caches, the accelerator default) through the
    kernel with RoPE and the cache write folded in, which must then run once per layer."""
    import smoljax.kernels.decode_attention as kernels

    traced = []
    monkeypatch.setattr(kernels, "append_and_attend",
                        lambda *args, **kwargs: traced.append(1) or append_and_attend(*args, **kwargs))
    prompts = [[5, 17, 33, 9, 11, 40, 3], [40, 41]]
    tokens = {impl: generation.generate(tiny_params, TINY, prompts, max_new_tokens=6, stop_tokens=[],
                                        attn_impl=impl, unroll_layers=unroll, unstack_layers=unroll).tokens
              for impl in ("xla", "pallas")}
    assert tokens["pallas"] == tokens["xla"]
    assert len(traced) == (TINY.num_hidden_layers if unroll else 0)


def test_the_folded_decode_kernel_needs_whole_blocks_in_the_model_dtype():
    """The kernel attends to the new key before storing it, so a cache in a narrower dtype than the model (or one
    not a whole number of kernel blocks) keeps the plain path, which rounds the key through the cache first."""
    from smoljax.attention import appends_in_kernel

    assert appends_in_kernel("pallas", jnp.float32, jnp.float32, 128)
    assert not appends_in_kernel("pallas", jnp.float32, jnp.bfloat16, 128)
    assert not appends_in_kernel("pallas", jnp.float32, jnp.float32, 100)
    assert not appends_in_kernel("xla", jnp.float32, jnp.float32, 128)


HEAD64 = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                     eos_token_id=2, pad_token_id=0)


def test_fused_decode_layers_give_the_reference_tokens():
    """The five-kernel decode layer (RMSNorm+q/k/v; RoPE, the cache write and attention; merge+o+residual;
    RMSNorm+gate/up+SwiGLU; down+residual) continues a prompt exactly as the XLA path does (f32)."""
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32),
                          llama_specs(HEAD64), is_leaf=lambda x: hasattr(x, "axes"))
    prompt = [[5, 17, 33, 9, 11, 70, 3]]
    tokens = {fused: generation.generate(params, HEAD64, prompt, max_new_tokens=5, stop_tokens=[],
                                         attn_impl="xla", fused_layers=fused).tokens for fused in (False, True)}
    assert tokens[True] == tokens[False]
    with pytest.raises(InputError, match="batch 1"):
        generation.generate(params, HEAD64, prompt * 2, max_new_tokens=2, fused_layers=True)


def test_fused_decode_layers_are_the_default_for_one_row_on_a_gpu(monkeypatch):
    """Asked for: on or an error. By default: one row, a GPU, attention left to choose, weights on one device."""
    use = generation.use_fused_layers
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not use(HEAD64, 1, None)  # the CPU runs the kernels only in the interpreter
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert use(HEAD64, 1, None) and use(HEAD64, 1, None, "pallas")
    assert not use(HEAD64, 2, None) and not use(HEAD64, 1, None, "xla") and not use(HEAD64, 1, False)
    odd_heads = dataclasses.replace(HEAD64, head_dim=48)
    assert not use(odd_heads, 1, None)
    with pytest.raises(InputError, match="batch 1"):
        use(HEAD64, 2, True)


def _half_full_cache(config, slots, live, dtype, seed):
    """A one-row per-layer cache of `slots` slots holding random keys and values in [3, live) after 3 slots of
    left padding; the next token goes to slot `live`."""
    rng = np.random.default_rng(seed)
    shape = (1, slots, config.num_key_value_heads, config.head_dim)
    filled = (np.arange(slots) < live)[None, :, None, None]
    buffers = [tuple(jnp.asarray(rng.standard_normal(shape) * filled, dtype) for _ in range(config.num_hidden_layers))
               for _ in "kv"]
    segments = ((np.arange(slots) >= 3) & (np.arange(slots) < live)).astype(np.int32)[None]
    positions = np.clip(np.arange(slots) - 3, 0, None).astype(np.int32)[None]
    return generation.KVCache(k=buffers[0], v=buffers[1], positions=jnp.asarray(positions),
                              segments=jnp.asarray(segments), end=jnp.asarray(live, jnp.int32))


# SmolLM2-360M's and SmolVLM2's layout in small: widths that are no power of two (192 = 128 + 64, 320 = 256 + 64,
# 5 query heads = 4 + 1) and one KV head for all five query heads.
ODD_WIDTHS = LlamaConfig(vocab_size=96, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
                         eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("config,dtype,slots,live", [
    (HEAD64, jnp.float32, 128, 70), (HEAD64, jnp.bfloat16, 128, 70), (HEAD64, jnp.float32, 640, 600),
    (HEAD64, jnp.bfloat16, 640, 600), (ODD_WIDTHS, jnp.float32, 192, 130)],
    ids=["2-splits-f32", "2-splits-bf16", "10-splits-f32", "10-splits-bf16", "odd-widths-f32"])
def test_fused_decode_layers_match_the_xla_step(config, dtype, slots, live):
    """One decode step through the five fused kernels against the XLA path on the same cache: logits and the new
    cache rows. Two splits are merged inside the o-projection kernel; ten (more than it merges itself) by XLA
    first."""
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), dtype),
                          llama_specs(config), is_leaf=lambda x: hasattr(x, "axes"))
    serving = smollm2.unstack_layers(smollm2.fuse_projections(params))
    cache = _half_full_cache(config, slots, live, dtype, seed=4)
    token, position = jnp.asarray([[41]]), jnp.asarray([[live - 3]])
    fused_logits, fused_cache = smollm2.fused_decode_forward(serving, token, cache, config, positions=position)
    xla_logits, xla_cache = smollm2.forward_with_cache(serving, token, cache, config, positions=position,
                                                       segment_ids=jnp.ones_like(token), attn_impl="xla", unroll=True)
    tolerance = {jnp.float32: 1e-5, jnp.bfloat16: 0.03}[dtype]
    np.testing.assert_allclose(fused_logits, xla_logits, atol=tolerance, rtol=tolerance)
    for fused_rows, xla_rows in zip(fused_cache.k + fused_cache.v, xla_cache.k + xla_cache.v):
        np.testing.assert_allclose(np.asarray(fused_rows[0, live], np.float32),
                                   np.asarray(xla_rows[0, live], np.float32), atol=tolerance / 3, rtol=tolerance)
        np.testing.assert_array_equal(fused_rows[0, :live], xla_rows[0, :live])
    assert int(fused_cache.end) == live + 1


def test_dispatch_picks_by_backend_dtype_and_kind(monkeypatch):
    assert attention_kind(1, True, True, object()) == "decode"
    assert attention_kind(7, True, True, object()) == "prefill"
    assert attention_kind(7, False, True, None) == "bidirectional"
    assert attention_kind(7, True, False, None) == "causal"
    assert attention_kind(7, True, True, None) == "packed"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve_implementation("auto", jnp.bfloat16, "decode") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert {kind: resolve_implementation("auto", jnp.bfloat16, kind) for kind in KINDS} == GPU_AUTO
    assert resolve_implementation("auto", jnp.float32, "packed") == "xla"
    assert resolve_implementation("cudnn", jnp.float32, "packed") == "cudnn"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_implementation("auto", jnp.float32, "causal") == "pallas"


def test_bad_kernel_inputs_give_one_line_errors():
    q, k, v = _qkv(1, 8, 8, 5, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k, v, interpret=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        decode_attention(q[:, 0], k, v, jnp.ones((1, 8), jnp.int32), jnp.zeros(1, jnp.int32),
                         jnp.ones(1, jnp.int32), interpret=True)
    q, k, v = _qkv(1, 8, 8, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="both q_segments and kv_segments"):
        flash_attention(q, k, v, q_segments=jnp.ones((1, 8), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_implementation("flash")
