#!/usr/bin/env python3
"""Prefill layouts timed against each other in one process, in alternating rounds (random bf16 weights).

    python3 benchmarks/ab_prefill.py --shapes 1x2048,8x2048 --rounds 4 --calls 20 [--baseline PATH] [--out F.json]

Each variant is generate()'s prefill of an empty cache (`prefill(..., empty_cache=True)` with the cache allocated
inside the same jit) in one layout: the layer weights stacked as loaded or fused into q/k/v and gate/up
(`fuse_projections`, generate()'s default on accelerators), the cache stacked or per layer (generate()'s
default on accelerators), the layers scanned or unrolled, RMSNorm folded into the projections or not, the attention
left to `auto` or named (`-pallas`, `-xla`, `-cudnn`).
`--baseline` names a file holding another version of `smoljax/models/smollm2.py`: generation's prefill runs with
it in place of the installed one as extra variants ("base-..."), so an old and a new layer loop are timed in the
same process. `--ragged` left-pads rows of random lengths (bench_generate's `--prefill-ragged`); tok/s then counts
real tokens, MFU the padded shape's FLOPs. Rounds alternate the variants so that drift in the GPU's clocks falls on
all of them alike; the table gives each variant's median over rounds of the per-round median call.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time

import harness

harness.use_checkout_if_not_installed()

from bench_generate import padded_prefill_batch  # noqa: E402
from bench_suite import prefill_flops_per_token  # noqa: E402

PEAK_FLOPS = 798e12  # the H100's measured bf16 matmul peak (bench_suite's --peak-flops)


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched(module, name: str, value):
    """Within the block, `module.name` is `value` (left alone when `value` is None or the module lacks it)."""
    if value is None or not hasattr(module, name):
        yield
        return
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def prefill_program(config, cache_length: int, per_layer: bool, fuse: bool, unroll: bool, attn_impl: str):
    """generate()'s prefill (`generation.prefill(..., empty_cache=True)`, the cache allocated in the same jit) in
    one layout; per-layer weights (`unstack_layers`) make the layer loop run unrolled."""
    import jax
    from smoljax.cache import init_cache
    from smoljax.generation import prefill
    from smoljax.models import smollm2

    @jax.jit
    def run(params, tokens, segments):
        if fuse:
            params = smollm2.fuse_projections(params)
        if unroll:
            params = smollm2.unstack_layers(params)
        cache = init_cache(config, tokens.shape[0], cache_length, params["embed"].dtype, per_layer=per_layer)
        return prefill(params, tokens, segments, cache, config, attn_impl, empty_cache=True)
    return run


def time_rounds(programs: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Per variant, the median call time of each round; the variants take turns within each round."""
    import jax

    medians = {name: [] for name in programs}
    for _ in range(rounds):
        for name, (run, _) in programs.items():
            jax.block_until_ready(run())  # warm
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    return medians


def profile_programs(programs: dict, path: str, iterations: int = 3, top: int = 12) -> None:
    """Each variant's kernels (profile_gpu.py's trace and summary), printed briefly and written to `path`."""
    import jax
    from profile_gpu import summarise, trace_and_read

    summaries = {}
    for name, (run, _) in programs.items():
        events, seconds = trace_and_read(lambda run=run: jax.block_until_ready(run()), iterations)
        summary = summaries[name] = summarise(events, iterations, top)
        if "error" in summary:
            print(f"\n{name}: {summary['error']}")
            continue
        print(f"\n{name}: wall {seconds / iterations * 1e3:.2f} ms, busy {summary['busy_us_per_iteration']:,.0f} us, "
              f"idle {summary['idle_share']:.0%}, {summary['kernels_per_iteration']:.0f} kernels")
        for group in summary["groups"][:top]:
            print(f"  {group['us_per_iteration']:8.1f} us {group['count_per_iteration']:5.0f}x  {group['op'][:100]}")
    with open(path, "w") as f:
        json.dump(summaries, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x2048,8x2048")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per variant per round")
    parser.add_argument("--variants", default="stacked,fused-stacked,fused-per-layer,fused-per-layer-unrolled",
                        help="comma-separated: [fused-](stacked|per-layer)[-unrolled][-nofold][-pallas|-xla|-cudnn]")
    parser.add_argument("--ragged", action="store_true",
                        help="rows left-padded to the shape, their lengths drawn from [T/2, T] (bench_generate's)")
    parser.add_argument("--baseline", default="", help="another smollm2.py whose layer loop also runs")
    parser.add_argument("--hlo-dir", default="", help="write each variant's optimised HLO here")
    parser.add_argument("--profile-dir", default="", help="also trace each variant's kernels into this folder")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    for folder in (args.hlo_dir, args.profile_dir):
        if folder:
            os.makedirs(folder, exist_ok=True)

    import jax
    import jax.numpy as jnp
    import smoljax
    from smoljax import generation
    from smoljax.generation import bucket_length
    from smoljax.models import smollm2

    config = smoljax.preset("SmolLM2-135M-Instruct")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                          smoljax.init_params(smoljax.llama_specs(config), jax.random.key(0)))
    models = {"new": smollm2}
    if args.baseline:
        models["base"] = load_module(args.baseline, "baseline_smollm2")

    results = []
    for shape in args.shapes.split(","):
        batch, seq = (int(n) for n in shape.split("x"))
        tokens, segments = padded_prefill_batch(batch, seq, args.ragged, config.vocab_size, config.pad_token_id or 0)
        tokens, segments = jnp.asarray(tokens), jnp.asarray(segments)
        real_tokens = int(jnp.sum(segments != 0))
        programs = {}
        for model_name, model in models.items():
            for variant in args.variants.split(","):
                fuse, unroll = variant.startswith("fused-"), "-unrolled" in variant
                per_layer = "per-layer" in variant
                attn_impl = next((impl for impl in ("pallas", "xla", "cudnn") if variant.endswith(f"-{impl}")),
                                 "auto")
                run = prefill_program(config, bucket_length(seq), per_layer, fuse, unroll, attn_impl)
                name = f"{model_name}-{variant}"
                start = time.perf_counter()
                # Traced with `model` as generation's layer loop, and the fold switched off for "-nofold".
                with patched(generation, "smollm2", model if model is not smollm2 else None), \
                        patched(model, "FOLD_NORM_MIN_TOKENS", 10**9 if "-nofold" in variant else None):
                    compiled = run.lower(params, tokens, segments).compile()
                compile_s = time.perf_counter() - start
                if args.hlo_dir:
                    with open(f"{args.hlo_dir}/{name}-{shape}.hlo.txt", "w") as f:
                        f.write(compiled.as_text())
                programs[name] = (lambda compiled=compiled: compiled(params, tokens, segments), compile_s)
        medians = time_rounds(programs, args.rounds, args.calls)
        if args.profile_dir:
            profile_programs(programs, f"{args.profile_dir}/profile-{shape}.json")
        flops = batch * seq * prefill_flops_per_token(seq)  # of the padded shape; tok/s counts real tokens
        label = f"{shape} ragged" if args.ragged else shape
        print(f"\n## prefill {label}\n\n| variant | ms (median of rounds) | rounds | tok/s | MFU | compile s |")
        print("|---|---:|---|---:|---:|---:|")
        for name, per_round in medians.items():
            seconds = statistics.median(per_round)
            row = {"shape": shape, "variant": name, "seconds": seconds, "rounds_s": per_round,
                   "tok_s": real_tokens / seconds, "mfu": flops / seconds / PEAK_FLOPS,
                   "compile_s": programs[name][1]}
            results.append(row)
            print(f"| {name} | {seconds * 1e3:.3f} | {' '.join(f'{t * 1e3:.2f}' for t in per_round)} | "
                  f"{row['tok_s']:,.0f} | {row['mfu']:.1%} | {row['compile_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv, "jax": jax.__version__, "device": str(jax.devices()[0]),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
