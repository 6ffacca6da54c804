"""Per-kernel cost of a batch-1 decode layer: each Pallas kernel of `smoljax.kernels.decode_layer` and the XLA
layer it replaces, run back to back inside one jitted `fori_loop` (as a decode loop runs them), smoljax only.

    python3 benchmarks/bench_decode_layer.py [--iterations 2000]

Reports microseconds per iteration: launch and execution of the kernel(s) with the loop's own overhead, which the
`empty loop` row measures. SmolLM2-135M layer shapes, bf16, a 320-slot cache with 288 live slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import harness

harness.use_checkout_if_not_installed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import smoljax  # noqa: E402
from smoljax import nn  # noqa: E402
from smoljax.cache import init_cache  # noqa: E402
from smoljax.kernels import decode_layer as fused  # noqa: E402
from smoljax.kernels.decode_attention import grouped_decode_attention  # noqa: E402
from smoljax.models import smollm2  # noqa: E402

SLOTS, LIVE = 320, 288


def per_iteration(body, carry, iterations: int) -> float:
    """Seconds per iteration of fori_loop(body) over `iterations`, median of 5 runs after a compiling one."""
    run = jax.jit(lambda c: jax.lax.fori_loop(0, iterations, lambda i, c: body(c), c))
    jax.block_until_ready(run(carry))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run(carry))
        times.append(time.perf_counter() - start)
    return sorted(times)[2] / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    config = smoljax.preset("SmolLM2-135M-Instruct")
    params = smoljax.init_params(smoljax.llama_specs(config), jax.random.key(0))
    params = smollm2.unstack_layers(smollm2.fuse_projections(jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                                                                          params)))
    layer = params["layers"][0]
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    x = jax.random.normal(jax.random.key(1), (hidden,), jnp.bfloat16)
    cos, sin = nn.rope_cos_sin(jnp.full((1, 1), LIVE - 1), head_dim, config.rope_theta, jnp.bfloat16)
    cos, sin = cos[0, 0], sin[0, 0]
    k_cache = jax.random.normal(jax.random.key(2), (SLOTS, kv_heads, head_dim), jnp.bfloat16)
    v_cache = jax.random.normal(jax.random.key(3), (SLOTS, kv_heads, head_dim), jnp.bfloat16)
    segments = (jnp.arange(SLOTS) < LIVE).astype(jnp.int32)
    end = jnp.asarray(LIVE - 1, jnp.int32)
    n = args.iterations
    rows = {}
    rows["empty loop"] = per_iteration(lambda c: c + 1, x, n)

    def whole_layer(c):
        x, k, v = c
        return fused.decode_layer(layer, x, cos, sin, k, v, segments, jnp.int32(0), end, config)

    rows["fused layer (5 kernels)"] = per_iteration(whole_layer, (x, k_cache, v_cache), n)

    q = jnp.zeros((1, kv_heads, 16, head_dim), jnp.bfloat16)
    rows["attention kernel, 1 split"] = per_iteration(
        lambda q: grouped_decode_attention(q, k_cache[None], v_cache[None], segments[None], jnp.zeros(1, jnp.int32),
                                           jnp.full((1,), LIVE), num_splits=1), q, n)
    rows["attention kernel, 5 splits + merge"] = per_iteration(
        lambda q: grouped_decode_attention(q, k_cache[None], v_cache[None], segments[None], jnp.zeros(1, jnp.int32),
                                           jnp.full((1,), LIVE), num_splits=5), q, n)
    h = jnp.ones((mlp,), jnp.bfloat16)
    rows["down + residual kernel"] = per_iteration(
        lambda x: fused._row_tiled(fused._down_kernel, "down", (h, layer["down_proj_t"], x), hidden, x.dtype, False),
        x, n)
    rows["down + residual, XLA"] = per_iteration(
        lambda x: x + jnp.einsum("m,hm->h", h, layer["down_proj_t"]), x, n)

    # The XLA decode layer the fused one replaces: one unrolled layer of the serving path.
    one_layer = dataclasses.replace(config, num_hidden_layers=1)
    cache = init_cache(one_layer, 1, SLOTS, jnp.bfloat16, per_layer=True)
    xla_params = {**params, "layers": [layer]}

    def xla_layer(c):
        x, cache = c
        out, cache = smollm2.decoder_stack(xla_params, x, one_layer, positions=jnp.full((1, 1), 5),
                                           segments=jnp.ones((1, 1), jnp.int32), cache=cache._replace(end=end),
                                           attn_impl="pallas", unroll=True)
        return out, cache

    rows["XLA layer (pallas attention)"] = per_iteration(xla_layer, (x[None, None], cache), n)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| loop body | us per iteration |\n|---|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e6:.2f} |")


if __name__ == "__main__":
    main()
