#!/usr/bin/env python3
"""Prefill layouts timed against each other in one process, in alternating rounds (random bf16 weights).

    python3 benchmarks/ab_prefill.py --shapes 1x2048,8x2048 --rounds 4 --calls 20 [--baseline PATH] [--out F.json]

Each variant is generate()'s prefill of an empty cache (`prefill(..., empty_cache=True)` with the cache allocated
inside the same jit) in one layout: the layer weights stacked as loaded or fused into q/k/v and gate/up
(`fuse_projections`, generate()'s default on accelerators), the cache stacked or per layer (generate()'s
default on accelerators), the layers scanned or unrolled. `--baseline` names a file holding another version of
`smoljax/models/smollm2.py`: its `decoder_stack` runs as extra variants ("base-..."), so an old and a new layer
loop are timed in the same process. Rounds alternate the variants so that drift in the GPU's clocks falls on all
of them alike; the table gives each variant's median over rounds of the per-round median call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import harness

harness.use_checkout_if_not_installed()

from bench_suite import prefill_flops_per_token  # noqa: E402

PEAK_FLOPS = 798e12  # the H100's measured bf16 matmul peak (bench_suite's --peak-flops)


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prefill_program(model, config, cache_length: int, per_layer: bool, fuse: bool, unroll: bool):
    """generate()'s prefill (generation.prefill with empty_cache=True) written against `model`'s layer loop."""
    import jax
    import jax.numpy as jnp
    from smoljax.cache import init_cache

    @jax.jit
    def run(params, tokens, segments):
        if fuse:
            params = model.fuse_projections(params)
        cache = init_cache(config, tokens.shape[0], cache_length, params["embed"].dtype, per_layer=per_layer)
        positions = model.segment_positions(segments)
        lengths = jnp.sum(segments != 0, axis=1).astype(jnp.int32)
        pad_counts = segments.shape[1] - lengths
        x = model.shift_rows(model.embed(params, tokens), -pad_counts)
        hidden, cache = model.decoder_stack(params, x, config, positions=positions, segments=segments, cache=cache,
                                            pad_counts=pad_counts, unroll=unroll)
        last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
        return model.lm_logits(params, last, config)[:, 0], cache
    return run


class fold_threshold:
    """Within the block, `model` folds RMSNorm into the projections from `tokens` tokens on (10**9: never), if it
    has that switch (`smollm2.FOLD_NORM_MIN_TOKENS`)."""

    def __init__(self, model, tokens: int | None):
        self.model, self.tokens = model, tokens

    def __enter__(self):
        self.saved = getattr(self.model, "FOLD_NORM_MIN_TOKENS", None)
        if self.tokens is not None and self.saved is not None:
            self.model.FOLD_NORM_MIN_TOKENS = self.tokens

    def __exit__(self, *exc):
        if self.saved is not None:
            self.model.FOLD_NORM_MIN_TOKENS = self.saved


def train_programs(model, fold_variants: list[str], batch: int, seq: int):
    """bench_train.py's smoljax step (bf16, remat dots_attention, unrolled layers, loss chunk 8192, AdamW) per
    variant: "train" as the code stands, "train-nofold" with the norm never folded."""
    import jax
    import jax.numpy as jnp
    import smoljax
    from smoljax.params import init_params, llama_specs
    from smoljax.training.optimizer import OptimizerConfig, lr_schedule, make_optimizer
    from smoljax.training.step import StepOptions, init_state, make_train_step

    config = smoljax.preset("SmolLM2-135M")
    opt_config = OptimizerConfig(learning_rate=3e-4, warmup_steps=0, decay="constant", weight_decay=0.1,
                                 b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0)
    optimizer = make_optimizer(opt_config, 100)
    options = StepOptions(compute_dtype="bfloat16", remat="dots_attention", attn_impl="auto", packed=False,
                          loss_chunk=8192, unroll_layers=True)
    ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    shape = (batch, seq)
    data = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones(shape, jnp.float32),
            "segment_ids": jnp.ones(shape, jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), shape)}
    programs = {}
    for variant in fold_variants:
        state = jax.jit(lambda key: init_state(init_params(llama_specs(config), key), optimizer))(jax.random.key(0))
        step = jax.jit(make_train_step(config, optimizer, lr_schedule(opt_config, 100), options), donate_argnums=0)
        start = time.perf_counter()
        with fold_threshold(model, 10**9 if variant.endswith("nofold") else None):
            compiled = step.lower(state, {}, data).compile()
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], {}, data)
            return metrics
        programs[variant] = (run, time.perf_counter() - start)
    return programs


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
    from profile_gpu import summarise, trace_and_read

    summaries = {}
    import jax

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
                        help="comma-separated: [fused-](stacked|per-layer)[-unrolled][-nofold]")
    parser.add_argument("--baseline", default="", help="another smollm2.py whose decoder_stack also runs")
    parser.add_argument("--hlo-dir", default="", help="write each variant's optimised HLO here")
    parser.add_argument("--train", default="", help="also time the training step at BATCHxLENGTH with the norm "
                        "folded and not (e.g. 16x2048)")
    parser.add_argument("--profile-dir", default="", help="also trace each variant's kernels into this folder")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import smoljax
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
        tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
        segments = jnp.ones_like(tokens)
        programs = {}
        for model_name, model in models.items():
            for variant in args.variants.split(","):
                fuse, unroll = variant.startswith("fused-"), "-unrolled" in variant
                per_layer = "per-layer" in variant
                run = prefill_program(model, config, bucket_length(seq), per_layer, fuse, unroll)
                name = f"{model_name}-{variant}"
                start = time.perf_counter()
                with fold_threshold(model, 10**9 if variant.endswith("-nofold") else None):
                    compiled = run.lower(params, tokens, segments).compile()
                compile_s = time.perf_counter() - start
                if args.hlo_dir:
                    with open(f"{args.hlo_dir}/{name}-{shape}.hlo.txt", "w") as f:
                        f.write(compiled.as_text())
                programs[name] = (lambda compiled=compiled: compiled(params, tokens, segments), compile_s)
        medians = time_rounds(programs, args.rounds, args.calls)
        if args.profile_dir:
            profile_programs(programs, f"{args.profile_dir}/profile-{shape}.json")
        flops = batch * seq * prefill_flops_per_token(seq)
        print(f"\n## prefill {shape}\n\n| variant | ms (median of rounds) | rounds | tok/s | MFU | compile s |")
        print("|---|---:|---|---:|---:|---:|")
        for name, per_round in medians.items():
            seconds = statistics.median(per_round)
            row = {"shape": shape, "variant": name, "seconds": seconds, "rounds_s": per_round,
                   "tok_s": batch * seq / seconds, "mfu": flops / seconds / PEAK_FLOPS,
                   "compile_s": programs[name][1]}
            results.append(row)
            print(f"| {name} | {seconds * 1e3:.3f} | {' '.join(f'{t * 1e3:.2f}' for t in per_round)} | "
                  f"{row['tok_s']:,.0f} | {row['mfu']:.1%} | {row['compile_s']:.1f} |")
    if args.train:
        batch, seq = (int(n) for n in args.train.split("x"))
        programs = train_programs(smollm2, ["train", "train-nofold"], batch, seq)
        medians = time_rounds(programs, args.rounds, max(2, args.calls // 4))
        print(f"\n## training step {args.train}\n\n| variant | ms (median of rounds) | rounds | tok/s | compile s |")
        print("|---|---:|---|---:|---:|")
        for name, per_round in medians.items():
            seconds = statistics.median(per_round)
            results.append({"shape": args.train, "variant": name, "seconds": seconds, "rounds_s": per_round,
                            "tok_s": batch * seq / seconds, "compile_s": programs[name][1]})
            print(f"| {name} | {seconds * 1e3:.2f} | {' '.join(f'{t * 1e3:.1f}' for t in per_round)} | "
                  f"{batch * seq / seconds:,.0f} | {programs[name][1]:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv, "jax": jax.__version__, "device": str(jax.devices()[0]),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
