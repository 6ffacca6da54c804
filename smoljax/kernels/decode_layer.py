"""A whole SmolLM2 decoder layer for one token (batch 1) in five Pallas (Triton) kernels.

A batch-1 decode step reads 270 MB of weights, ~0.09 ms at HBM speed, but XLA runs it as ~10 kernels a layer, each
paying a launch and a dependent round trip to memory: the step is bound by kernel count, not bytes. These kernels
fuse each layer into five launches, four of them a matrix-vector product with its neighbours folded in:

1. RMSNorm -> q/k/v projection;
2. RoPE, the cache write and split-K attention (`decode_attention.append_and_attend`, its splits left unmerged);
3. the merge of the splits -> o projection -> residual;
4. RMSNorm -> gate/up projection -> SwiGLU;
5. down projection -> residual.

A product's program owns a few output rows (`TILES`) and loads each of its weight rows whole, as the fewest
power-of-two pieces (576 = 512 + 64): every load is issued up front, ahead of the input vector the kernel before
wrote, and the weights stream at HBM speed. Many small programs of one warp each beat XLA's matrix-vector fusion
on the H100 (`benchmarks/sweep_matvec.py`; the numbers are in `benchmarks/NOTES-kernels.md` §20). Rounding follows
the XLA path: products accumulate in f32 and are rounded to the model dtype where the XLA path rounds (after
RMSNorm, each projection, the merge, SwiGLU, each residual add). Weights are the serving layout of
`smollm2.fuse_projections` ([out, in]), one layer's own buffers (`smollm2.unstack_layers`), so no slice of a stacked
weight is copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from smoljax.config import LlamaConfig

# (output rows a program, warps a program) of each product: the fastest of a sweep on the H100.
TILES = {"qkv": (1, 1), "o": (1, 1), "gate_up": (1, 1), "down": (1, 1)}
# Splits of the attention over the cache (None: `decode_attention.choose_splits`) and warps of its programs.
ATTENTION_SPLITS: int | None = None
ATTENTION_WARPS = 4


def _pieces(width: int) -> tuple[tuple[int, int], ...]:
    """[start, size) pieces covering [0, width) with the fewest powers of two (Triton's block sizes)."""
    pieces, start = [], 0
    for bit in reversed(range(width.bit_length())):
        if width - start >= 1 << bit:
            pieces.append((start, 1 << bit))
            start += 1 << bit
    return tuple(pieces)


def _f32(ref, *index) -> jax.Array:
    return ref[index].astype(jnp.float32)


def _rms_normed(x_ref, g_ref, eps: float) -> list[jax.Array]:
    """RMSNorm of x as `nn.rms_norm` rounds it, piece by piece (f32 values of the model dtype)."""
    dtype, pieces = x_ref.dtype, _pieces(x_ref.shape[0])
    xs = [_f32(x_ref, pl.ds(start, size)) for start, size in pieces]
    inv_rms = jax.lax.rsqrt(sum(jnp.sum(x * x) for x in xs) / x_ref.shape[0] + eps)
    return [(_f32(g_ref, pl.ds(start, size)) * (x * inv_rms).astype(dtype).astype(jnp.float32)).astype(dtype)
            .astype(jnp.float32) for (start, size), x in zip(pieces, xs)]


def _load_rows(w_ref, first_row, rows: int) -> list[jax.Array]:
    """W[first_row:first_row + rows] as `_pieces` of its width, in the weights' dtype."""
    return [w_ref[pl.ds(first_row, rows), pl.ds(start, size)] for start, size in _pieces(w_ref.shape[-1])]


def _times(weight_pieces: list[jax.Array], vector: list[jax.Array]) -> jax.Array:
    """sum_k W[i, k] * v[k] -> f32 [rows], W and v both given as the same `_pieces`."""
    return sum(jnp.sum(w.astype(jnp.float32) * piece[None, :], axis=1) for w, piece in zip(weight_pieces, vector))


def _plus_residual(x_ref, first_row, rows: int, product: jax.Array, dtype) -> jax.Array:
    """x[rows] + product rounded to the model dtype, the sum rounded again (the XLA path's two roundings)."""
    return (_f32(x_ref, pl.ds(first_row, rows)) + product.astype(dtype).astype(jnp.float32)).astype(dtype)


def _norm_qkv_kernel(x_ref, g_ref, w_ref, out_ref, *, eps: float, rows: int):
    first_row = pl.program_id(0) * rows
    weights = _load_rows(w_ref, first_row, rows)
    out_ref[...] = _times(weights, _rms_normed(x_ref, g_ref, eps)).astype(out_ref.dtype)


def _merged_heads(acc_ref, m_ref, l_ref, first_head: int, heads: int, dtype) -> jax.Array:
    """The attention output of heads [first_head, first_head + heads) from the splits' partial results, each split
    loaded on its own (split counts are no power of two), rounded to the model dtype -> f32 [heads, D]."""
    from smoljax.kernels.decode_attention import merge_split_list

    head_slice, splits = pl.ds(first_head, heads), range(m_ref.shape[0])
    merged = merge_split_list([_f32(m_ref, s, head_slice) for s in splits],
                              [_f32(l_ref, s, head_slice) for s in splits],
                              [_f32(acc_ref, s, head_slice, slice(None)) for s in splits])
    return merged.astype(dtype).astype(jnp.float32)


def _merge_o_kernel(acc_ref, m_ref, l_ref, w_ref, x_ref, out_ref, *, rows: int):
    # w_ref: o_proj [hidden, Hq, D]; the heads go in power-of-two pieces (9 = 8 + 1).
    first_row = pl.program_id(0) * rows
    head_pieces = _pieces(w_ref.shape[1])
    weights = [w_ref[pl.ds(first_row, rows), pl.ds(first_head, heads), :] for first_head, heads in head_pieces]
    product = jnp.zeros((rows,), jnp.float32)
    for w, (first_head, heads) in zip(weights, head_pieces):
        attn = _merged_heads(acc_ref, m_ref, l_ref, first_head, heads, x_ref.dtype)
        product += jnp.sum(jnp.sum(w.astype(jnp.float32) * attn[None], axis=2), axis=1)
    out_ref[...] = _plus_residual(x_ref, first_row, rows, product, x_ref.dtype)


def _norm_gate_up_kernel(x_ref, g_ref, w_ref, out_ref, *, eps: float, rows: int):
    first_row, mlp, dtype = pl.program_id(0) * rows, w_ref.shape[0] // 2, x_ref.dtype
    gate_weights, up_weights = _load_rows(w_ref, first_row, rows), _load_rows(w_ref, mlp + first_row, rows)
    normed = _rms_normed(x_ref, g_ref, eps)
    gate = _times(gate_weights, normed).astype(dtype).astype(jnp.float32)
    up = _times(up_weights, normed).astype(dtype).astype(jnp.float32)
    out_ref[...] = (jax.nn.silu(gate).astype(dtype).astype(jnp.float32) * up).astype(dtype)


def _down_kernel(h_ref, w_ref, x_ref, out_ref, *, rows: int):
    first_row = pl.program_id(0) * rows
    weights = _load_rows(w_ref, first_row, rows)
    h = [_f32(h_ref, pl.ds(start, size)) for start, size in _pieces(h_ref.shape[0])]
    out_ref[...] = _plus_residual(x_ref, first_row, rows, _times(weights, h), x_ref.dtype)


def supported(config: LlamaConfig) -> bool:
    """Whether the layer shapes tile: a power-of-two head_dim (the attention kernel's blocks) and output widths in
    whole tiles."""
    widths = {"qkv": (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim,
              "o": config.hidden_size, "gate_up": config.intermediate_size, "down": config.hidden_size}
    return (config.head_dim == pl.next_power_of_2(config.head_dim) and config.head_dim >= 16
            and all(widths[name] % rows == 0 for name, (rows, _) in TILES.items()))


def _full(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _row_tiled(kernel, name: str, operands: tuple, out_len: int, dtype, interpret: bool, **options) -> jax.Array:
    """`kernel` over programs that each write `TILES[name]` rows of a [out_len] vector, reading whole operands."""
    rows, warps = TILES[name]
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=warps, num_stages=1)
    return pl.pallas_call(
        functools.partial(kernel, rows=rows, **options),
        grid=(out_len // rows,),
        in_specs=[_full(operand.shape) for operand in operands],
        out_specs=pl.BlockSpec((rows,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((out_len,), dtype),
        compiler_params=params,
        interpret=interpret,
        name=f"smoljax_decode_{name}",
    )(*operands)


def decode_layer(layer: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                 v_cache: jax.Array, kv_segments: jax.Array, kv_start: jax.Array, end: jax.Array,
                 config: LlamaConfig, *, interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer for one token.

    layer: serving-layout weights of one layer (attn_norm, qkv_proj_t, o_proj_t, mlp_norm, gate_up_proj_t,
    down_proj_t); x: [hidden] residual stream; cos, sin: [head_dim] RoPE tables of the token's position;
    k_cache, v_cache: [S, Hkv, D] this layer's cache, S a multiple of `smoljax.cache.CACHE_BLOCK` (the new row is
    written at slot `end`); kv_segments [S] (holding the new token's segment), kv_start [] int: the live slots
    [kv_start, end]. Returns (x after the layer, k_cache, v_cache).
    """
    from smoljax.cache import CACHE_BLOCK
    from smoljax.kernels.decode_attention import UNROLLED_MERGE_MAX_SPLITS, append_and_attend, merge_splits

    hidden, mlp, eps = config.hidden_size, config.intermediate_size, config.rms_norm_eps
    q_heads, head_dim = config.num_attention_heads, config.head_dim
    qkv = _row_tiled(functools.partial(_norm_qkv_kernel, eps=eps), "qkv", (x, layer["attn_norm"],
                     layer["qkv_proj_t"]), layer["qkv_proj_t"].shape[0], x.dtype, interpret)
    (acc, m, l), k_cache, v_cache = append_and_attend(
        qkv.reshape(1, -1, head_dim), cos[None], sin[None], k_cache[None], v_cache[None], kv_segments[None],
        jnp.reshape(kv_start, (1,)), jnp.reshape(end + 1, (1,)), q_heads=q_heads, block_k=CACHE_BLOCK,
        num_splits=ATTENTION_SPLITS and min(ATTENTION_SPLITS, k_cache.shape[0] // CACHE_BLOCK),
        num_warps=ATTENTION_WARPS, merge=False, interpret=interpret)
    acc, m, l = acc[0], m[0], l[0]
    if m.shape[0] > UNROLLED_MERGE_MAX_SPLITS:
        # A long cache's many splits are merged by XLA's reductions first; the kernel then sees one split.
        acc = merge_splits(acc, m, l).astype(x.dtype).astype(jnp.float32)[None]
        m, l = jnp.zeros(m.shape[1:], jnp.float32)[None], jnp.ones(l.shape[1:], jnp.float32)[None]
    o_proj = layer["o_proj_t"].reshape(hidden, q_heads, head_dim)
    x = _row_tiled(_merge_o_kernel, "o", (acc, m, l, o_proj, x), hidden, x.dtype, interpret)
    swiglu = _row_tiled(functools.partial(_norm_gate_up_kernel, eps=eps), "gate_up",
                        (x, layer["mlp_norm"], layer["gate_up_proj_t"]), mlp, x.dtype, interpret)
    x = _row_tiled(_down_kernel, "down", (swiglu, layer["down_proj_t"], x), hidden, x.dtype, interpret)
    return x, k_cache[0], v_cache[0]
