"""Small pure building blocks of the decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, accumulated in f32 and cast back before the weight, as HF's LlamaRMSNorm does.

    x: [..., hidden], weight: [hidden] -> [..., hidden] in x.dtype.
    """
    normed = (x.astype(jnp.float32) * inverse_rms(x, eps)).astype(x.dtype)
    return weight.astype(x.dtype) * normed


def inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    """1 / sqrt(mean(x^2) + eps) over the last axis in f32: x [..., hidden] -> [..., 1] (RMSNorm's scale)."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies [head_dim // 2] in f32, as HF computes them."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, head_dim] for HF's half-split RoPE, computed in f32 and cast to `dtype`.

    positions: [B, T] int.
    """
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x: [B, T, heads, head_dim] by cos/sin: [B, T, head_dim] (half-split: pairs are (i, i + D/2))."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The SwiGLU gate: silu(gate) * up, both [..., mlp] (the MLP is down(swiglu(x @ gate_w, x @ up_w)))."""
    return jax.nn.silu(gate) * up



def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with statistics in f32, as torch computes it for f32 and bf16 inputs.

    x: [..., hidden], scale/bias: [hidden] -> [..., hidden] in x.dtype.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(variance + eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch's `gelu(approximate="tanh")`, HF's gelu_pytorch_tanh)."""
    return jax.nn.gelu(x, approximate=True)
