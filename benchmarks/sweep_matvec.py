"""Per-kernel cost of a batch-1 matrix-vector product, the building block of a fused decode layer: XLA's fusion
against Pallas (Triton) kernels of several tilings, smoljax only.

    python3 benchmarks/sweep_matvec.py [--iterations 200] [--json PATH]

Each product runs in a chain over 30 distinct weight matrices (one per layer of SmolLM2-135M), so the weights come
from HBM as in a real decode step and not from the 50 MB L2, inside one jitted `fori_loop`. Reports microseconds
per product (the chain's time over its length). Shapes: the fused q/k/v [960, 576], o [576, 576], gate/up
[3072, 576] and down [576, 1536], bf16 with f32 accumulation.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import harness

harness.use_checkout_if_not_installed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from smoljax.kernels import decode_layer  # noqa: E402

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def pow2_pieces(width: int, chunk: int | None) -> list[tuple[int, int]]:
    """[start, size) pieces covering [0, width): fixed `chunk`s, or the fewest powers of two (as the fused layer
    loads them)."""
    if chunk:
        return [(start, chunk) for start in range(0, width, chunk)]
    return list(decode_layer._pieces(width))


def _matvec_kernel(x_ref, w_ref, out_ref, *, rows: int, pieces):
    first = pl.program_id(0) * rows
    acc = jnp.zeros((rows,), jnp.float32)
    for start, size in pieces:
        tile = w_ref[pl.ds(first, rows), pl.ds(start, size)].astype(jnp.float32)
        acc += jnp.sum(tile * x_ref[pl.ds(start, size)].astype(jnp.float32)[None, :], axis=1)
    out_ref[...] = acc.astype(out_ref.dtype)


def pallas_matvec(w: jax.Array, x: jax.Array, *, rows: int, warps: int, chunk: int | None,
                  interpret: bool = False) -> jax.Array:
    """w [N, K] @ x[:K] -> [N], `rows` outputs a program."""
    out_len, width = w.shape
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=warps, num_stages=1)
    return pl.pallas_call(
        functools.partial(_matvec_kernel, rows=rows, pieces=pow2_pieces(width, chunk)),
        grid=(out_len // rows,),
        in_specs=[pl.BlockSpec(x.shape, lambda i: (0,)), pl.BlockSpec(w.shape, lambda i: (0, 0))],
        out_specs=pl.BlockSpec((rows,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((out_len,), x.dtype),
        compiler_params=params, interpret=interpret, name="sweep_matvec",
    )(x, w)


def xla_matvec(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.dot(w, x[:w.shape[1]], preferred_element_type=jnp.float32).astype(x.dtype)


def chain(product, weights: list[list[jax.Array]], x: jax.Array) -> jax.Array:
    """x through every layer's products in turn (each product's input is the previous one's output)."""
    for layer in weights:
        for w in layer:
            x = product(w, x)
    return x


def per_product_us(product, weights, x, iterations: int) -> float:
    def body(i, x):
        out = chain(product, weights, x)
        return jnp.tile(out, -(-x.shape[0] // out.shape[0]))[:x.shape[0]]
    run = jax.jit(lambda x: jax.lax.fori_loop(0, iterations, body, x))
    jax.block_until_ready(run(x))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - start)
    products = iterations * sum(len(layer) for layer in weights)
    return sorted(times)[2] / products * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--shapes", default="o,qkv,gate_up+down")
    parser.add_argument("--rows", default="2,4,8,16")
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--chunks", default="0,64", help="0: fewest power-of-two pieces")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    results = []
    for group in args.shapes.split(","):
        names = group.split("+")
        weights = [[(jax.random.normal(next(keys), SHAPES[n], jnp.float32) * 0.04).astype(jnp.bfloat16)
                    for n in names] for _ in range(LAYERS)]
        x = jax.random.normal(next(keys), (max(SHAPES[n][1] for n in names),), jnp.bfloat16)
        variants = [("xla", xla_matvec)]
        for rows, warps, chunk in itertools.product(map(int, args.rows.split(",")), map(int, args.warps.split(",")),
                                                    map(int, args.chunks.split(","))):
            variants.append((f"pallas rows={rows} warps={warps} chunk={chunk or 'pow2'}",
                             functools.partial(pallas_matvec, rows=rows, warps=warps, chunk=chunk or None)))
        for label, product in variants:
            try:
                us = per_product_us(product, weights, x, args.iterations)
            except Exception as error:  # a tiling Triton rejects
                print(f"{group:14s} {label:40s} failed: {str(error).splitlines()[0][:100]}", flush=True)
                continue
            results.append({"shapes": group, "variant": label, "us_per_product": us})
            print(f"{group:14s} {label:40s} {us:7.2f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(jax.devices()[0]), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
