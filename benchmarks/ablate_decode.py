#!/usr/bin/env python3
"""Where decode time goes: smoljax greedy decode under variants of one knob at a time, smoljax only.

    python3 benchmarks/ablate_decode.py                        # the default variant list, batch 1
    python3 benchmarks/ablate_decode.py --batch 32 --variants base,fused

Each variant runs in its own child process (XLA flags are read once per process) with random SmolLM2-135M weights,
a 32-token prompt and `--new-tokens` greedy tokens with stop tokens off. It prints tokens/s of the compiled loop
(compilation excluded) and the number of device kernels in one compiled decode step: on accelerators a batch-1
step is bound by kernel launches, so that count is the figure to drive down. The reference comparison lives in
bench_generate.py; this script only ranks smoljax's own options against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (generate() keyword arguments, extra XLA flags); all but the fused-layers ones keep the XLA layers
VARIANTS: dict[str, tuple[dict, str]] = {
    "base": ({"fuse_projections": False, "fused_layers": False}, ""),
    "fused": ({"fuse_projections": True, "fused_layers": False}, ""),
    "fused+cudnn": ({"fuse_projections": True, "fused_layers": False, "attn_impl": "cudnn"}, ""),
    "fused+xla": ({"fuse_projections": True, "attn_impl": "xla"}, ""),
    "fused+pallas": ({"fuse_projections": True, "attn_impl": "pallas", "fused_layers": False}, ""),
    "fused-layers": ({"fuse_projections": True, "attn_impl": "pallas", "fused_layers": True}, ""),
    "fused-layers+graphs": ({"fuse_projections": True, "attn_impl": "pallas", "fused_layers": True},
                            "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
                            "--xla_gpu_graph_min_graph_size=1"),
    "fused-layers+graphs+while": ({"fuse_projections": True, "attn_impl": "pallas", "fused_layers": True},
                                  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,"
                                  "CONDITIONAL --xla_gpu_graph_min_graph_size=1"),
    "fused-layers+nographs": ({"fuse_projections": True, "attn_impl": "pallas", "fused_layers": True},
                              "--xla_gpu_enable_command_buffer="),
    "fused+pallas+nographs": ({"fuse_projections": True, "attn_impl": "pallas", "fused_layers": False},
                              "--xla_gpu_enable_command_buffer="),
    "fused+graphs": ({"fuse_projections": True, "fused_layers": False},
                     "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
                     "--xla_gpu_graph_min_graph_size=1"),
    "fused+graphs+while": ({"fuse_projections": True, "fused_layers": False},
                           "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL "
                           "--xla_gpu_graph_min_graph_size=1"),
    "fused+nographs": ({"fuse_projections": True, "fused_layers": False}, "--xla_gpu_enable_command_buffer="),
    "fused+cublas": ({"fuse_projections": True, "fused_layers": False}, "--xla_gpu_enable_triton_gemm=false"),
}

# HLO opcodes that launch nothing: they only name or regroup buffers.
_NO_KERNEL = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id"}


def count_step_kernels(compiled_text: str) -> dict[str, int]:
    """Opcode counts of the ENTRY computation of a compiled decode step (one entry ~ one kernel launch)."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    counts: dict[str, int] = {}
    for opcode in re.findall(r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*.*?\s([a-z][a-z0-9-]*)\(", entry, re.MULTILINE):
        if opcode not in _NO_KERNEL:
            counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def run_child(variant: str, batch: int, new_tokens: int, repeats: int, dtype: str, dump_dir: str | None) -> dict:
    sys.path.insert(0, REPO_ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import smoljax
    from smoljax.cache import whole_blocks
    from smoljax.generation import decode_step, generate
    from smoljax.models import smollm2

    kwargs, _ = VARIANTS[variant]
    config = smoljax.preset("SmolLM2-135M-Instruct")
    params = smoljax.init_params(smoljax.llama_specs(config), jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, config.vocab_size, size=(batch, 32)).tolist()
    rates = []
    for _ in range(repeats + 1):  # the first call also compiles; its decode time is still excluded
        result = generate(params, config, prompts, max_new_tokens=new_tokens, stop_tokens=(), **kwargs)
        rates.append(batch * new_tokens / result.seconds)

    unroll = jax.default_backend() != "cpu"
    fused_layers = bool(kwargs.get("fused_layers"))
    step_params = smollm2.fuse_projections(params) if kwargs.get("fuse_projections") or fused_layers else params
    if fused_layers:
        step_params = smollm2.unstack_layers(step_params)
    # The step as the loop runs it: a cache of whole kernel blocks, donated so it is updated in place.
    cache = smoljax.init_cache(config, batch, whole_blocks(32 + new_tokens), params["embed"].dtype,
                               per_layer=unroll or fused_layers)
    step = jax.jit(decode_step, static_argnames=("config", "attn_impl", "unroll_layers", "fused_layers"),
                   donate_argnames=("cache",))
    text = step.lower(step_params, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), cache,
                      config, kwargs.get("attn_impl", "auto"), unroll, fused_layers).compile().as_text()
    kernels = count_step_kernels(text)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"decode_step_{variant.replace('+', '-')}_b{batch}.hlo.txt"), "w") as f:
            f.write(text)
    return {"variant": variant, "tokens_per_s": max(rates[1:]), "all_rates": rates,
            "kernels_per_step": sum(kernels.values()), "kernel_opcodes": kernels,
            "device": str(jax.devices()[0].device_kind)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled decode step here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.batch, args.new_tokens, args.repeats, args.dtype,
                                                    args.dump_hlo)))
        return

    results = []
    for variant in args.variants.split(","):
        _, flags = VARIANTS[variant]
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        dtype = args.dtype or ("bfloat16" if _has_gpu() else "float32")
        command = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--dtype", dtype]
        if args.dump_hlo:
            command += ["--dump-hlo", args.dump_hlo]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"variant": variant, "error": " | ".join(tail)})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        row = results[-1]
        if "error" in row:
            print(f"{variant:22s} FAILED: {row['error']}", flush=True)
        else:
            print(f"{variant:22s} {row['tokens_per_s']:10.1f} tok/s   {row['kernels_per_step']:5d} kernels/step   "
                  f"{row['device']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _has_gpu() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "gpu"


if __name__ == "__main__":
    main()
