#!/usr/bin/env python3
"""Where a smoljax program spends its GPU time: kernel by kernel, from a JAX profiler trace.

    python3 benchmarks/profile_gpu.py --parts decode train prefill vision --out-dir /tmp/profile
    python3 benchmarks/profile_gpu.py --parts train --layers 2 --batch 2 --seq 128   # small, to try it out

Each part runs its workload (the benchmark suite's shapes, random bf16 weights) once to compile and warm up, then
under `jax.profiler.trace`, and reads the trace back with `jax.profiler.ProfileData` (no TensorBoard needed). It
prints, per part:

- the traced wall time, the GPU busy time (union of all kernel intervals) and the idle share: a large idle share
  means the GPU waits on launches or the host, not on its kernels;
- the kernels by total time, grouped by the HLO op that launched them when the trace names it.

The JSON (`--out-dir`) keeps every group. On a machine without a GPU the trace has no device plane and the part
says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("decode", "train", "prefill", "vision", "vlm_prefill")


def gpu_kernel_events(xplane_path: str) -> list[dict[str, Any]]:
    """Every kernel event on the first GPU plane: name, start and duration (ns), and its HLO op if named."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            # Stream lines hold kernels and copies; the "XLA Ops"/"XLA Modules" lines are summaries of the same time.
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                stats = dict(event.stats)
                events.append({"name": event.name, "start": event.start_ns, "duration": event.duration_ns,
                               "hlo_op": stats.get("hlo_op") or stats.get("tf_op") or "",
                               "line": line.name})
    return events


def busy_time(events: list[dict[str, Any]]) -> float:
    """Nanoseconds in which at least one kernel runs (the union of the intervals)."""
    total, end = 0.0, float("-inf")
    for ev in sorted(events, key=lambda e: e["start"]):
        start, stop = ev["start"], ev["start"] + ev["duration"]
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarise(events: list[dict[str, Any]], iterations: int, top: int) -> dict[str, Any]:
    if not events:
        return {"error": "the trace has no GPU kernel events (no GPU, or the profiler could not attach)"}
    span = max(e["start"] + e["duration"] for e in events) - min(e["start"] for e in events)
    busy = busy_time(events)
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in events:
        key = ev["name"][:90] if not ev["hlo_op"] else f"{ev['hlo_op'][:60]}  [{ev['name'][:70]}]"
        groups[key][0] += 1
        groups[key][1] += ev["duration"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return {
        "iterations": iterations, "kernels": len(events), "kernels_per_iteration": len(events) / iterations,
        "span_us_per_iteration": span / 1e3 / iterations, "busy_us_per_iteration": busy / 1e3 / iterations,
        "idle_share": 1 - busy / span,
        "mean_kernel_us": sum(e["duration"] for e in events) / len(events) / 1e3,
        "groups": [{"op": k, "count_per_iteration": c / iterations, "us_per_iteration": d / 1e3 / iterations,
                    "share_of_busy": d / busy} for k, (c, d) in ranked],
        "top": top,
    }


def trace_and_read(run: Callable[[], Any], iterations: int) -> tuple[list[dict[str, Any]], float]:
    """Kernel events of `iterations` traced calls, and the wall seconds of as many untraced ones."""
    import jax

    run()  # compile and warm up outside the trace
    run()
    start = time.perf_counter()
    for _ in range(iterations):  # untraced: the wall time of a call without the profiler's overhead
        run()
    seconds = time.perf_counter() - start
    trace_dir = tempfile.mkdtemp(prefix="smoljax-profile-")
    with jax.profiler.trace(trace_dir):
        for _ in range(iterations):
            run()
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    return (gpu_kernel_events(paths[0]) if paths else []), seconds


# ----------------------------------------------------------------------------------------------------------------------
# Workloads: the benchmark suite's shapes with random weights
# ----------------------------------------------------------------------------------------------------------------------

def _text_model(args):
    import jax
    import smoljax

    config = smoljax.preset("SmolLM2-135M-Instruct")
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    params = smoljax.init_params(smoljax.llama_specs(config), jax.random.key(0))
    return config, params


def decode_workload(args) -> tuple[Callable[[], Any], int]:
    """One generate() call: batch `--decode-batch`, 32-token prompt, 256 new tokens; iterations = decode steps."""
    import jax
    import numpy as np
    from smoljax.generation import generate

    config, params = _text_model(args)
    params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    prompts = np.random.default_rng(0).integers(100, config.vocab_size, size=(args.decode_batch, 32)).tolist()
    kwargs = {"fused_layers": True} if args.fused_layers else {}

    def run():
        return generate(params, config, prompts, max_new_tokens=args.new_tokens, stop_tokens=(),
                        attn_impl=args.attn_impl, **kwargs)
    return run, args.new_tokens


def prefill_workload(args) -> tuple[Callable[[], Any], int]:
    """Prefill of `--batch` x `--seq` tokens into a KV cache, as generate() compiles it."""
    import jax
    import jax.numpy as jnp
    from smoljax.cache import init_cache, whole_blocks
    from smoljax.generation import prefill
    from smoljax.models import smollm2

    config, params = _text_model(args)
    params = smollm2.fuse_projections(jax.tree.map(lambda x: x.astype(args.dtype), params))
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size)
    segments = jnp.ones_like(tokens)

    @jax.jit
    def program(params, tokens, segments):
        cache = init_cache(config, tokens.shape[0], whole_blocks(args.seq + 256), params["embed"].dtype,
                           per_layer=True)
        return prefill(params, tokens, segments, cache, config, args.attn_impl, empty_cache=True)

    return lambda: jax.block_until_ready(program(params, tokens, segments)), 1


def train_workload(args) -> tuple[Callable[[], Any], int]:
    """One AdamW step on `--batch` x `--seq` tokens, as benchmarks/bench_train.py runs it."""
    import jax
    import jax.numpy as jnp
    import smoljax
    from smoljax.params import init_params, llama_specs
    from smoljax.training.optimizer import OptimizerConfig, lr_schedule, make_optimizer
    from smoljax.training.step import StepOptions, init_state, make_train_step

    config = smoljax.preset("SmolLM2-135M")
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    opt_config = OptimizerConfig(learning_rate=3e-4, warmup_steps=0, decay="constant", weight_decay=0.1,
                                 b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0)
    optimizer = make_optimizer(opt_config, 100)
    options = StepOptions(compute_dtype="bfloat16", remat=args.remat, attn_impl=args.attn_impl, packed=False,
                          loss_chunk=args.loss_chunk, unroll_layers=args.unroll_layers)
    state = jax.jit(lambda key: init_state(init_params(llama_specs(config), key), optimizer))(jax.random.key(0))
    step = jax.jit(make_train_step(config, optimizer, lr_schedule(opt_config, 100), options), donate_argnums=0)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, config.vocab_size)
    shape = (args.batch, args.seq)
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones(shape, jnp.float32),
             "segment_ids": jnp.ones(shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), shape)}
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], {}, batch)
        return jax.block_until_ready(metrics)
    return run, 1


def vision_workload(args) -> tuple[Callable[[], Any], int]:
    """The SmolVLM2-500M vision encoder and connector on `--tiles` 512 x 512 tiles."""
    import jax
    import jax.numpy as jnp
    import smoljax
    from smoljax.models import smolvlm2
    from smoljax.params import vlm_specs

    config = smoljax.preset("SmolVLM2-500M-Video-Instruct")
    if args.layers:
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_hidden_layers=args.layers))
    params = smoljax.init_params(vlm_specs(config), jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    size = config.vision.image_size
    pixels = jax.random.uniform(jax.random.key(1), (args.tiles, 3, size, size), jnp.float32, -1, 1)
    mask = jnp.ones((args.tiles, size, size), bool)
    encode = jax.jit(lambda p, x, m: smolvlm2.image_features(p, x, m, config, args.attn_impl))
    return lambda: jax.block_until_ready(encode(params, pixels, mask)), 1


def vlm_prefill_workload(args) -> tuple[Callable[[], Any], int]:
    """SmolVLM2-500M image+text prefill from host inputs, as generate() starts: one `--tiles`-tile image plus 60
    text tokens, left-padded, encoded and merged (`prompt_embeddings`), then prefilled into a KV cache."""
    import jax
    import jax.numpy as jnp
    import smoljax
    from smoljax.cache import init_cache
    from smoljax.generation import bucket_length, left_pad, prefill, prompt_embeddings
    from smoljax.models import smollm2
    from smoljax.params import vlm_specs

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_vlm import make_inputs

    config = smoljax.preset("SmolVLM2-500M-Video-Instruct")
    if args.layers:
        config = dataclasses.replace(
            config, vision=dataclasses.replace(config.vision, num_hidden_layers=args.layers),
            text=dataclasses.replace(config.text, num_hidden_layers=args.layers))
    params = jax.tree.map(lambda x: x.astype(args.dtype), smoljax.init_params(vlm_specs(config), jax.random.key(0)))
    prompt, pixels, mask = make_inputs(args.tiles, 60, config.image_seq_len, config.image_token_id,
                                       config.vision.image_size)
    text_config = config.text
    bucket = bucket_length(len(prompt))
    cache_length = bucket + bucket_length(args.new_tokens)

    @jax.jit
    def program(text_params, tokens, segments, embeds):
        text_params = smollm2.fuse_projections(text_params)
        cache = init_cache(text_config, tokens.shape[0], cache_length, text_params["embed"].dtype, per_layer=True)
        return prefill(text_params, tokens, segments, cache, text_config, args.attn_impl, embeds, empty_cache=True)

    def run():
        tokens, segments = left_pad([prompt], bucket, 0)
        embeds = prompt_embeddings(params, config, tokens, pixels, mask, args.attn_impl)
        return jax.block_until_ready(program(params["text"], jnp.asarray(tokens), jnp.asarray(segments), embeds))
    return run, 1


WORKLOADS = {"decode": decode_workload, "prefill": prefill_workload, "train": train_workload,
             "vision": vision_workload, "vlm_prefill": vlm_prefill_workload}


def print_summary(part: str, summary: dict[str, Any]) -> None:
    print(f"\n## {part}")
    print(f"wall time per call (untraced): {summary['wall_ms_per_call']:,.2f} ms")
    if "error" in summary:
        print(summary["error"])
        return
    print(f"per iteration: {summary['span_us_per_iteration']:,.1f} us traced, {summary['busy_us_per_iteration']:,.1f} "
          f"us busy ({summary['idle_share']:.0%} idle), {summary['kernels_per_iteration']:.1f} kernels, "
          f"mean kernel {summary['mean_kernel_us']:.2f} us")
    print(f"{'us/iter':>10} {'share':>6} {'n/iter':>7}  op")
    for group in summary["groups"][:summary["top"]]:
        print(f"{group['us_per_iteration']:>10,.1f} {group['share_of_busy']:>6.1%} "
              f"{group['count_per_iteration']:>7.1f}  {group['op']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn-impl", default="auto")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers (0: the model's own)")
    parser.add_argument("--batch", type=int, default=16, help="train batch (prefill uses --prefill-batch)")
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--fused-layers", action="store_true")
    parser.add_argument("--remat", default="dots")
    parser.add_argument("--loss-chunk", type=int, default=8192)
    parser.add_argument("--unroll-layers", action="store_true", help="train: layers unrolled instead of scanned")
    parser.add_argument("--tiles", type=int, default=17)
    parser.add_argument("--iterations", type=int, default=2, help="traced calls (decode: generate calls)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out-dir", default="")
    args = parser.parse_args()
    sys.path.insert(0, REPO_ROOT)

    results = {}
    for part in args.parts:
        part_args = argparse.Namespace(**vars(args))
        if part == "prefill":
            part_args.batch = args.prefill_batch
        run, per_call = WORKLOADS[part](part_args)
        events, seconds = trace_and_read(run, args.iterations)
        results[part] = summarise(events, args.iterations * per_call, args.top)
        results[part]["wall_ms_per_call"] = seconds * 1e3 / args.iterations
        print_summary(part, results[part])
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "profile.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
