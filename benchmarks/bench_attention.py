"""Attention forward + backward at SmolLM2-135M's head layout: which implementation to use for training and prefill.

    python3 benchmarks/bench_attention.py                    # T = 2048, 4096, 8192 on the default device
    python3 benchmarks/bench_attention.py --seq 2048 --batch 16

Times `jax.grad` of sum(attention(q, k, v)) (forward + backward, bf16, 9 query heads over 3 KV heads, head_dim 64)
for each implementation behind `smoljax.attention`, plus cuDNN told only "causal" (no segment mask), which is what
an unpacked batch needs. Reports ms per call and TFLOP/s: causal attention's forward FLOPs are 4 * T * T * D / 2 per
head (QK^T and PV over half the score matrix); the backward pass adds 2.5 times that, so a call counts 3.5 times.
"""

from __future__ import annotations

import argparse
import time

import harness

harness.use_checkout_if_not_installed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from smoljax.attention import attention  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def implementations(batch: int, seq: int):
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    segments = jnp.ones((batch, seq), jnp.int32)

    def through_dispatch(impl):
        def run(q, k, v):
            return attention(q, k, v, q_segments=segments, kv_segments=segments, q_positions=positions,
                             kv_positions=positions, causal=True, implementation=impl)
        return run

    def cudnn_causal_only(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    impls = {"xla (masked)": through_dispatch("xla")}
    if jax.default_backend() == "gpu":
        impls["cudnn (dense mask)"] = through_dispatch("cudnn")
        impls["cudnn (causal only)"] = cudnn_causal_only
    return impls


def time_call(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // seq (default 32768)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| T | batch | implementation | fwd+bwd ms | TFLOP/s |\n|---:|---:|---|---:|---:|")
    for seq in args.seq:
        batch = max(args.tokens // seq, 1)
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(keys[0], (batch, seq, Q_HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        forward_flops = 4 * batch * Q_HEADS * seq * seq * HEAD_DIM / 2  # causal: half the score matrix
        for name, impl in implementations(batch, seq).items():
            grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(impl(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
            try:
                seconds = time_call(grad, q, k, v, repeats=args.repeats)
            except Exception as error:  # noqa: BLE001 - report and go on (e.g. out of memory)
                print(f"| {seq} | {batch} | {name} | failed: {str(error).splitlines()[0][:80]} | |")
                continue
            print(f"| {seq} | {batch} | {name} | {seconds * 1e3:.2f} | {3.5 * forward_flops / seconds / 1e12:.0f} |")


if __name__ == "__main__":
    main()
