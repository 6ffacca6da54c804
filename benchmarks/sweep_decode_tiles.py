"""Batch-1 decode through the fused layer kernels (`smoljax.kernels.decode_layer`) under several tilings of their
products, against the default XLA path, in one process (alternated), smoljax only.

    python3 benchmarks/sweep_decode_tiles.py [--tilings "o=4x1;o=8x2"] [--rounds 2] [--json PATH]

A tiling sets (rows a program)x(warps) for named products (qkv, o, gate_up, down) and optionally the attention's
splits ('splits=N') and warps ('warps=N'); the rest keep the defaults.
Greedy, 32-token prompt, 256 new tokens, SmolLM2-135M shapes with random weights in bf16; tokens/s of the decode
loop (`GenerationResult.seconds`), best of 3 calls after a compiling one.
"""

from __future__ import annotations

import argparse
import json

import harness

harness.use_checkout_if_not_installed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import smoljax  # noqa: E402
from smoljax.generation import generate  # noqa: E402
from smoljax.kernels import decode_layer  # noqa: E402


def parse_tiling(text: str) -> dict:
    """'o=4x1,splits=2' -> the TILES of `decode_layer` with o changed, and the attention's splits under 'splits'."""
    tiles = dict(decode_layer.TILES)
    for item in filter(None, text.split(",")):
        name, value = (part.strip() for part in item.split("="))
        if name in ("splits", "warps"):
            tiles[name] = int(value)
            continue
        rows, warps = value.split("x")
        tiles[name] = (int(rows), int(warps))
    return tiles


def tokens_per_s(params, config, prompts, new_tokens: int, fused: bool) -> float:
    rates = []
    for _ in range(4):
        result = generate(params, config, prompts, max_new_tokens=new_tokens, stop_tokens=(), fused_layers=fused)
        rates.append(new_tokens / result.seconds)
    return max(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tilings", default="", help="';'-separated tilings, each 'name=RxW,...' ('' = defaults)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = smoljax.preset("SmolLM2-135M-Instruct")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                          smoljax.init_params(smoljax.llama_specs(config), jax.random.key(0)))
    prompts = np.random.default_rng(0).integers(100, config.vocab_size, size=(1, 32)).tolist()
    defaults = dict(decode_layer.TILES)
    variants = [("xla", None)] + [(f"fused {t or 'default'}", parse_tiling(t)) for t in args.tilings.split(";")]
    results = []
    for round_index in range(args.rounds):
        for label, tiles in variants:
            tiles = dict(tiles or defaults)
            decode_layer.ATTENTION_SPLITS = tiles.pop("splits", None)
            decode_layer.ATTENTION_WARPS = tiles.pop("warps", 4)
            decode_layer.TILES.clear()
            decode_layer.TILES.update(tiles)
            jax.clear_caches()  # the tiling is read at trace time
            rate = tokens_per_s(params, config, prompts, args.new_tokens, fused=label != "xla")
            results.append({"round": round_index, "variant": label, "tokens_per_s": rate})
            print(f"round {round_index} {label:50s} {rate:8.0f} tok/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
