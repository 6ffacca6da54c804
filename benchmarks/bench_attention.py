"""Attention kernels by kind of call, at SmolLM2-135M's and SigLIP's head layouts: the figures behind the dispatch
table `smoljax.attention.GPU_AUTO`.

    python3 benchmarks/bench_attention.py                       # every part on the default device
    python3 benchmarks/bench_attention.py --parts train decode  # some of: train, prefill, vision, decode
    python3 benchmarks/bench_attention.py --sweep               # Pallas flash tile sizes at each --seq
    python3 benchmarks/bench_attention.py --in-loop 30          # per call inside one jit, no dispatch

Parts (bf16, head_dim 64; median of --repeats calls after a compiling one):
- train: `jax.grad` of sum(attention) (forward + backward), 9 query / 3 KV heads, 32,768 tokens per call at T = 2048,
  4096 and 8192; causal attention does 4 * T^2 * D / 2 FLOPs per head forward, the backward 2.5 times that.
  Packed rows (segment ids) and plain causal rows (no segment ids) are timed separately.
- prefill: the forward pass of 1 x 2048 and 8 x 2048 new tokens written at slot 0 of a 2,304-slot KV cache.
- vision: SigLIP's bidirectional attention, 17 tiles x 1024 patches, 12 heads, forward only.
- decode: one token per row against a 2,304-slot cache (2,048 live), batch 1 and 64, plus 8,192 slots at batch 1.
"""

from __future__ import annotations

import argparse
import time

import harness

harness.use_checkout_if_not_installed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from smoljax.attention import CacheView, attention  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
CACHE_SLOTS = 2304


IN_LOOP = {"calls": 0}  # --in-loop N: time N chained calls inside one jit instead of one dispatched call


def chained(fn, calls: int):
    """fn run `calls` times in one jitted loop, each call's q depending on the last call's result through one
    element (an in-place update), so XLA cannot hoist the call out of the loop. Per-call time without the host
    dispatch that a single call pays, as inside a model's step."""
    def loop(q, *rest):
        def body(_, q):
            first = sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in jax.tree.leaves(fn(q, *rest)))
            return q.at[(0,) * q.ndim].set(first.astype(q.dtype))
        return jax.lax.fori_loop(0, calls, body, q)
    return jax.jit(loop)


def time_call(fn, *args, repeats: int = 10) -> float:
    if IN_LOOP["calls"]:
        return _time_dispatch(chained(fn, IN_LOOP["calls"]), *args, repeats=repeats) / IN_LOOP["calls"]
    return _time_dispatch(fn, *args, repeats=repeats)


def _time_dispatch(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_qkv(batch: int, q_len: int, kv_len: int, q_heads: int = Q_HEADS, kv_heads: int = KV_HEADS):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(keys[0], (batch, q_len, q_heads, HEAD_DIM), jnp.bfloat16),
            jax.random.normal(keys[1], (batch, kv_len, kv_heads, HEAD_DIM), jnp.bfloat16),
            jax.random.normal(keys[2], (batch, kv_len, kv_heads, HEAD_DIM), jnp.bfloat16))


def report(part: str, shape: str, name: str, seconds: float | None, flops: float | None, note: str = "") -> None:
    if seconds is None:
        print(f"| {part} | {shape} | {name} | failed: {note} | |", flush=True)
        return
    rate = f"{flops / seconds / 1e12:.0f}" if flops else ""
    print(f"| {part} | {shape} | {name} | {seconds * 1e3:.3f} | {rate} |", flush=True)


def run(part, shape, name, fn, args, flops, repeats):
    try:
        seconds = time_call(jax.jit(fn), *args, repeats=repeats)
    except Exception as error:  # noqa: BLE001 - report and go on (e.g. out of memory)
        report(part, shape, name, None, None, str(error).splitlines()[0][:90])
        return
    report(part, shape, name, seconds, flops)


def self_attention(impl: str, segments, positions, causal: bool = True):
    def call(q, k, v):
        return attention(q, k, v, q_segments=segments, kv_segments=segments, q_positions=positions,
                         kv_positions=positions, causal=causal, implementation=impl)
    return call


def gradient(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def part_train(args) -> None:
    impls = ["cudnn", "pallas"] if jax.default_backend() == "gpu" else ["xla", "pallas"]
    for seq in args.seq:
        batch = max(args.tokens // seq, 1)
        q, k, v = random_qkv(batch, seq, seq)
        flops = 3.5 * 4 * batch * Q_HEADS * seq * seq * HEAD_DIM / 2
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        segments = jnp.ones((batch, seq), jnp.int32)
        shape = f"{batch}x{seq}"
        for impl in impls:
            run("train", shape, f"{impl}, causal only", gradient(self_attention(impl, None, positions)),
                (q, k, v), flops, args.repeats)
            run("train", shape, f"{impl}, segment ids", gradient(self_attention(impl, segments, positions)),
                (q, k, v), flops, args.repeats)
        if seq == 2048:
            run("train", shape, "xla, segment ids", gradient(self_attention("xla", segments, positions)),
                (q, k, v), flops, args.repeats)


def cache_call(impl: str, slots: int, new: int, live: int):
    """Attention of `new` tokens written at slot live - new of a cache with `live` filled slots."""
    def call(q, k, v):
        batch = q.shape[0]
        kv_segments = jnp.broadcast_to((jnp.arange(slots) < live).astype(jnp.int32), (batch, slots))
        kv_positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
        q_positions = kv_positions[:, live - new: live]
        view = CacheView(q_offset=jnp.asarray(live - new, jnp.int32), kv_start=jnp.zeros((batch,), jnp.int32),
                         kv_end=jnp.full((batch,), live, jnp.int32))
        return attention(q, k, v, q_segments=jnp.ones((batch, new), jnp.int32), kv_segments=kv_segments,
                         q_positions=q_positions, kv_positions=kv_positions, causal=True, implementation=impl,
                         cache=view)
    return call


def accelerator_impls() -> list[str]:
    return ["xla", "cudnn", "pallas"] if jax.default_backend() == "gpu" else ["xla", "pallas"]


def part_prefill(args) -> None:
    for batch in (1, 8):
        q, k, v = random_qkv(batch, 2048, CACHE_SLOTS)
        flops = 4 * batch * Q_HEADS * 2048 * 2048 * HEAD_DIM / 2
        for impl in accelerator_impls():
            run("prefill", f"{batch}x2048 into {CACHE_SLOTS}", impl, cache_call(impl, CACHE_SLOTS, 2048, 2048),
                (q, k, v), flops, args.repeats)


def part_vision(args) -> None:
    tiles, patches, heads = 17, 1024, 12
    q, k, v = random_qkv(tiles, patches, patches, heads, heads)
    segments = jnp.ones((tiles, patches), jnp.int32)
    flops = 4 * tiles * heads * patches * patches * HEAD_DIM
    for impl in accelerator_impls():
        run("vision", f"{tiles}x{patches}, {heads} heads", impl, self_attention(impl, segments, segments, False),
            (q, k, v), flops, args.repeats)


def part_decode(args) -> None:
    for batch, slots, live in ((1, CACHE_SLOTS, 2048), (64, CACHE_SLOTS, 2048), (1, 8192, 8000)):
        q, k, v = random_qkv(batch, 1, slots)
        for impl in accelerator_impls():
            # Bytes the call must read: the live K and V rows.
            run("decode", f"b{batch}, {live}/{slots} slots", impl, cache_call(impl, slots, 1, live), (q, k, v),
                None, args.repeats)


FORWARD_TILES = ((64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                 (128, 128, 8, 3), (128, 32, 4, 3), (32, 64, 4, 3))
# (dK/dV query block, dK/dV key block, dQ query block, dQ key block, warps, stages)
BACKWARD_TILES = ((64, 64, 64, 64, 4, 2), (32, 128, 128, 32, 4, 2), (32, 128, 128, 32, 4, 3),
                  (32, 128, 128, 32, 8, 2), (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 2),
                  (64, 128, 64, 64, 4, 2), (32, 128, 64, 64, 4, 2), (64, 64, 128, 32, 4, 2), (64, 64, 64, 32, 4, 2))


def sweep(args) -> None:
    """Pallas flash tile sizes on causal rows without segment ids (the kind measured against cuDNN), at each of
    --seq, with cuDNN's figure alongside."""
    from smoljax.kernels.flash_attention import FlashBlocks, flash_attention

    for seq in args.seq:
        batch = max(args.tokens // seq, 1)
        q, k, v = random_qkv(batch, seq, seq)
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        flops_fwd = 4 * batch * Q_HEADS * seq * seq * HEAD_DIM / 2
        shape = f"{batch}x{seq}"
        cudnn = self_attention("cudnn", None, positions) if jax.default_backend() == "gpu" else None
        if "fwd" in args.sweep:
            if cudnn:
                run("sweep fwd", shape, "cudnn", cudnn, (q, k, v), flops_fwd, args.repeats)
            for block_q, block_k, warps, stages in FORWARD_TILES:
                blocks = FlashBlocks(block_q=block_q, block_k=block_k, warps=warps, stages=stages)
                run("sweep fwd", shape, f"q{block_q} k{block_k} w{warps} s{stages}",
                    lambda q, k, v, b=blocks: flash_attention(q, k, v, blocks=b), (q, k, v), flops_fwd,
                    args.repeats)
        if "bwd" not in args.sweep:
            continue
        if cudnn:
            run("sweep fwd+bwd", shape, "cudnn", gradient(cudnn), (q, k, v), 3.5 * flops_fwd, args.repeats)
        for dkv_q, dkv_k, dq_q, dq_k, warps, stages in BACKWARD_TILES:
            blocks = FlashBlocks(dkv_block_q=dkv_q, dkv_block_k=dkv_k, dq_block_q=dq_q, dq_block_k=dq_k,
                                 bwd_warps=warps, bwd_stages=stages)
            run("sweep fwd+bwd", shape, f"dkv q{dkv_q} k{dkv_k}, dq q{dq_q} k{dq_k}, w{warps} s{stages}",
                gradient(lambda q, k, v, b=blocks: flash_attention(q, k, v, blocks=b)), (q, k, v),
                3.5 * flops_fwd, args.repeats)


PARTS = {"train": part_train, "prefill": part_prefill, "vision": part_vision, "decode": part_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192], help="train part lengths")
    parser.add_argument("--tokens", type=int, default=32768, help="train part: batch = tokens // seq")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", nargs="*", choices=("fwd", "bwd"), default=None,
                        help="time Pallas flash tile sizes instead: forward, backward or (no value) both")
    parser.add_argument("--in-loop", type=int, default=0, metavar="N",
                        help="time N chained calls inside one jit (no host dispatch per call) and divide by N")
    args = parser.parse_args()
    IN_LOOP["calls"] = args.in_loop
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| part | shape | implementation | ms | TFLOP/s |\n|---|---|---|---:|---:|")
    if args.sweep is not None:
        args.sweep = args.sweep or ["fwd", "bwd"]
        sweep(args)
        return
    for name in args.parts:
        PARTS[name](args)


if __name__ == "__main__":
    main()
