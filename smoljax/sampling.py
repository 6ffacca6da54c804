"""Samplers: small pure functions from logits [B, V] to token ids [B].

A sampler is any callable `(logits, key) -> tokens`. `Sampler` composes the usual filters in transformers' order
(temperature, top-k, top-p, min-p) and is a frozen dataclass, so it is hashable and can be a static argument of a
jitted decode loop: the same settings reuse the same compiled program.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from smoljax.errors import InputError

NEG_INF = -jnp.inf


def greedy(logits: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Most likely token. logits: [B, V] -> [B] int32."""
    del key
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row; ties at the k-th value are kept too. [B, V] -> [B, V]."""
    kth_largest = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth_largest, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability mass reaches p (the nucleus). [B, V]."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # A token is in the nucleus while the mass of strictly more likely tokens is still below p.
    in_nucleus = mass_before < p
    cutoff = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, NEG_INF, logits)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Drops tokens whose probability is below min_p times the most likely token's. [B, V]."""
    log_threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logits < log_threshold, NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Temperature sampling with optional top-k, top-p and min-p filters; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise InputError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be in [0, 1) (0 disables it), got {self.min_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def filter(self, logits: jax.Array) -> jax.Array:
        """Temperature-scaled, filtered logits [B, V] from which `__call__` draws."""
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k:
            logits = top_k_filter(logits, min(self.top_k, logits.shape[-1]))
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p > 0.0:
            logits = min_p_filter(logits, self.min_p)
        return logits

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits: [B, V], key: a PRNG key -> tokens [B] int32."""
        if self.is_greedy:
            return greedy(logits)
        return jax.random.categorical(key, self.filter(logits), axis=-1).astype(jnp.int32)
