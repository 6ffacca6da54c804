"""A whole SmolLM2 decoder layer for one token (batch 1) in five Pallas (Triton) kernels.

A batch-1 decode step reads 270 MB of weights, ~0.09 ms at HBM speed, but XLA runs it as ~13 kernels a layer, each
paying a launch and a dependent round trip to memory: the step is bound by kernel count, not bytes. These kernels
fuse each layer into five launches, each a matrix-vector product with its neighbours folded in:

1. RMSNorm -> q/k/v projection -> RoPE, writing K and V straight into the cache row (the buffers are aliased);
2. decode attention over the live cache slots (`decode_attention`, one split: no merge launch);
3. o projection + residual;
4. RMSNorm -> gate/up projection -> SwiGLU;
5. down projection + residual.

Each program owns a tile of output rows and streams its weight rows in 64-wide chunks, multiplying on the CUDA
cores (a 1-row product gains nothing from tensor cores). Activations are rounded to bf16 between ops, as on the XLA path, with f32
accumulation; RMSNorm's 1/rms scales the products rather than the input (see `_scaled_chunks`). Weights are the serving layout of `smollm2.fuse_projections` ([out, in]), one layer's own
buffers (`smollm2.unstack_layers`), so no slice of a stacked weight is copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from smoljax.config import LlamaConfig

CHUNK = 64      # input columns per step of a product (hidden 576 = 9 chunks, MLP 1536 = 24)
ROWS = 8        # output rows per program of the o, gate/up and down products
HEAD_PARTS = 4  # programs per head of the q/k/v product (each: 8 rows of each RoPE half)


def _params(interpret: bool, warps: int = 4):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


def _inverse_rms(x_ref, hidden: int, eps: float):
    total = jnp.zeros((), jnp.float32)
    for c in range(hidden // CHUNK):
        chunk = x_ref[pl.ds(c * CHUNK, CHUNK)].astype(jnp.float32)
        total += jnp.sum(chunk * chunk)
    return jax.lax.rsqrt(total / hidden + eps)


def _scaled_chunks(x_ref, g_ref):
    """x * weight, chunk by chunk in f32: RMSNorm's numerator. The 1/rms factor is applied to the products
    instead, so the norm's reduction and the weight reads are independent and overlap (one trip to memory, not
    two); the products then differ from the XLA path's only by bf16 rounding of the normalised input."""
    return [x_ref[pl.ds(c * CHUNK, CHUNK)].astype(jnp.float32) * g_ref[pl.ds(c * CHUNK, CHUNK)].astype(jnp.float32)
            for c in range(x_ref.shape[0] // CHUNK)]


def _rows_times(w_ref, first_row, rows: int, vector_chunks) -> jax.Array:
    """sum_k W[first_row + i, k] * v[k] for i < rows, v given chunk by chunk (f32 [CHUNK] each) -> f32 [rows]."""
    acc = jnp.zeros((rows,), jnp.float32)
    for c, vector in enumerate(vector_chunks):
        tile = w_ref[pl.ds(first_row, rows), pl.ds(c * CHUNK, CHUNK)].astype(jnp.float32)
        acc += jnp.sum(tile * vector[None, :], axis=1)
    return acc


def _qkv_rope_kernel(end_ref, x_ref, g_ref, w_ref, cos_ref, sin_ref, _k_in, _v_in, q_ref, k_ref, v_ref, *,
                     eps: float, q_heads: int, kv_heads: int, group: int):
    # HEAD_PARTS programs per head of the fused q/k/v projection (9 query, 3 key, 3 value heads); each computes
    # matching rows of the two RoPE halves, which rotate into each other.
    head, part = pl.program_id(0) // HEAD_PARTS, pl.program_id(0) % HEAD_PARTS
    hidden, head_dim = x_ref.shape[0], cos_ref.shape[0]
    half = head_dim // 2
    rows = half // HEAD_PARTS
    inv_rms = _inverse_rms(x_ref, hidden, eps)
    scaled = _scaled_chunks(x_ref, g_ref)
    dtype = x_ref.dtype
    offset = part * rows
    first = (_rows_times(w_ref, head * head_dim + offset, rows, scaled) * inv_rms).astype(dtype)
    second = (_rows_times(w_ref, head * head_dim + half + offset, rows, scaled) * inv_rms).astype(dtype)
    first, second = first.astype(jnp.float32), second.astype(jnp.float32)
    cos = cos_ref[pl.ds(offset, rows)].astype(jnp.float32)
    sin = sin_ref[pl.ds(offset, rows)].astype(jnp.float32)
    rotated_first = (first * cos - second * sin).astype(dtype)
    rotated_second = (second * cos + first * sin).astype(dtype)
    slot = end_ref[0]

    @pl.when(head < q_heads)
    def _():
        q_ref[head // group, head % group, pl.ds(offset, rows)] = rotated_first
        q_ref[head // group, head % group, pl.ds(half + offset, rows)] = rotated_second

    @pl.when((head >= q_heads) & (head < q_heads + kv_heads))
    def _():
        k_ref[slot, head - q_heads, pl.ds(offset, rows)] = rotated_first.astype(k_ref.dtype)
        k_ref[slot, head - q_heads, pl.ds(half + offset, rows)] = rotated_second.astype(k_ref.dtype)

    @pl.when(head >= q_heads + kv_heads)
    def _():
        v_ref[slot, head - q_heads - kv_heads, pl.ds(offset, rows)] = first.astype(v_ref.dtype)
        v_ref[slot, head - q_heads - kv_heads, pl.ds(half + offset, rows)] = second.astype(v_ref.dtype)


def _o_proj_kernel(attn_ref, w_ref, x_ref, out_ref, *, group: int, q_heads: int):
    first_row = pl.program_id(0) * ROWS
    heads = [attn_ref[h // group, h % group, :].astype(jnp.float32) for h in range(q_heads)]
    projected = _rows_times(w_ref, first_row, ROWS, heads).astype(x_ref.dtype)
    out_ref[...] = x_ref[pl.ds(first_row, ROWS)] + projected


def _gate_up_kernel(x_ref, g_ref, w_ref, out_ref, *, eps: float):
    first_row = pl.program_id(0) * ROWS
    hidden, mlp = x_ref.shape[0], w_ref.shape[0] // 2
    inv_rms = _inverse_rms(x_ref, hidden, eps)
    scaled = _scaled_chunks(x_ref, g_ref)
    dtype = x_ref.dtype
    gate = (_rows_times(w_ref, first_row, ROWS, scaled) * inv_rms).astype(dtype)
    up = (_rows_times(w_ref, mlp + first_row, ROWS, scaled) * inv_rms).astype(dtype)
    out_ref[...] = (jax.nn.silu(gate.astype(jnp.float32)).astype(dtype) * up).astype(dtype)


def _down_kernel(h_ref, w_ref, x_ref, out_ref):
    first_row = pl.program_id(0) * ROWS
    chunks = [h_ref[pl.ds(c * CHUNK, CHUNK)].astype(jnp.float32) for c in range(h_ref.shape[0] // CHUNK)]
    out_ref[...] = x_ref[pl.ds(first_row, ROWS)] + _rows_times(w_ref, first_row, ROWS, chunks).astype(x_ref.dtype)


def supported(config: LlamaConfig) -> bool:
    """Whether the layer shapes tile: head_dim = one chunk, hidden and MLP widths in whole chunks."""
    return (config.head_dim == CHUNK and config.hidden_size % CHUNK == 0
            and config.intermediate_size % CHUNK == 0)


def _full(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _row_tiled(kernel, name: str, operands: tuple, out_len: int, dtype, interpret: bool) -> jax.Array:
    """A kernel whose programs each write ROWS entries of a [out_len] vector, reading whole operands."""
    return pl.pallas_call(
        kernel,
        grid=(out_len // ROWS,),
        in_specs=[_full(operand.shape) for operand in operands],
        out_specs=pl.BlockSpec((ROWS,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((out_len,), dtype),
        compiler_params=_params(interpret),
        interpret=interpret,
        name=f"smoljax_decode_{name}",
    )(*operands)


def decode_layer(layer: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                 v_cache: jax.Array, kv_segments: jax.Array, kv_start: jax.Array, end: jax.Array,
                 config: LlamaConfig, *, interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer for one token.

    layer: serving-layout weights of one layer (attn_norm, qkv_proj_t, o_proj_t, mlp_norm, gate_up_proj_t,
    down_proj_t); x: [hidden] residual stream; cos, sin: [head_dim] RoPE tables of the token's position;
    k_cache, v_cache: [S, Hkv, D] this layer's cache (the new row is written at slot `end`); kv_segments [S],
    kv_start [] int: the live slots [kv_start, end]. Returns (x after the layer, k_cache, v_cache).
    """
    from smoljax.kernels.decode_attention import grouped_decode_attention

    hidden, mlp = config.hidden_size, config.intermediate_size
    q_heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    group = q_heads // kv_heads
    rows = max(16, pl.next_power_of_2(group))
    eps = config.rms_norm_eps
    slot = jnp.asarray(end, jnp.int32).reshape(1)
    q, k_cache, v_cache = pl.pallas_call(
        functools.partial(_qkv_rope_kernel, eps=eps, q_heads=q_heads, kv_heads=kv_heads, group=group),
        grid=((q_heads + 2 * kv_heads) * HEAD_PARTS,),
        in_specs=[_full((1,)), _full((hidden,)), _full((hidden,)), _full(layer["qkv_proj_t"].shape),
                  _full((head_dim,)), _full((head_dim,)), _full(k_cache.shape), _full(v_cache.shape)],
        out_specs=[_full((kv_heads, rows, head_dim)), _full(k_cache.shape), _full(v_cache.shape)],
        out_shape=[jax.ShapeDtypeStruct((kv_heads, rows, head_dim), x.dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=_params(interpret),
        interpret=interpret,
        name="smoljax_decode_qkv_rope",
    )(slot, x, layer["attn_norm"], layer["qkv_proj_t"], cos, sin, k_cache, v_cache)
    attn = grouped_decode_attention(q[None], k_cache[None], v_cache[None], kv_segments[None],
                                    jnp.reshape(kv_start, (1,)), slot + 1, num_splits=1, interpret=interpret)[0]
    x = _row_tiled(functools.partial(_o_proj_kernel, group=group, q_heads=q_heads), "o_proj",
                   (attn, layer["o_proj_t"], x), hidden, x.dtype, interpret)
    hidden_mlp = _row_tiled(functools.partial(_gate_up_kernel, eps=eps), "gate_up",
                            (x, layer["mlp_norm"], layer["gate_up_proj_t"]), mlp, x.dtype, interpret)
    x = _row_tiled(_down_kernel, "down", (hidden_mlp, layer["down_proj_t"], x), hidden, x.dtype, interpret)
    return x, k_cache, v_cache
