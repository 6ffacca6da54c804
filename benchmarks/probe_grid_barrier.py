"""Cost of a grid-wide barrier inside one Pallas (Triton) kernel on this GPU: every program arrives on an atomic
counter and spins until all have, `iters` times in a row. Prints microseconds a barrier for several grid sizes.

    python3 benchmarks/probe_grid_barrier.py [--iters 200]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def grid_barrier(counter_ref, target):
    """Every program adds one to the counter, then waits until it reaches `target` (all programs' arrivals)."""
    plgpu.debug_barrier()  # the whole program's earlier stores are issued before its arrival (release)
    arrived = plgpu.atomic_add(counter_ref, 0, 1) + 1
    jax.lax.while_loop(lambda seen: seen < target, lambda _: plgpu.atomic_add(counter_ref, 0, 0), arrived)
    plgpu.debug_barrier()


def _kernel(counter_in, counter_ref, out_ref, *, iters: int, grid: int):
    del counter_in
    pid = pl.program_id(0)

    def step(i, total):
        grid_barrier(counter_ref, (i + 1) * grid)
        # Each program reads what another program wrote before the barrier (checks visibility).
        return total + out_ref[(pid + 1) % grid]

    out_ref[pid] = jnp.int32(1)
    total = jax.lax.fori_loop(0, iters, step, jnp.int32(0))
    grid_barrier(counter_ref, (iters + 1) * grid)
    out_ref[pid] = total


@functools.partial(jax.jit, static_argnames=("iters", "grid", "warps"))
def run(*, iters: int, grid: int, warps: int):
    counter = jnp.zeros((1,), jnp.int32)
    return pl.pallas_call(
        functools.partial(_kernel, iters=iters, grid=grid),
        grid=(grid,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((grid,), lambda i: (0,))],
        out_shape=[jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((grid,), jnp.int32)],
        input_output_aliases={0: 0},
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
    )(counter)


def seconds(fn, repeats: int = 20) -> float:
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    sms = jax.devices()[0].core_count
    print(f"{jax.devices()[0].device_kind}: {sms} SMs")
    for grid, warps in ((sms, 1), (sms, 4), (2 * sms, 1), (2 * sms, 4), (64, 4)):
        counter, out = run(iters=args.iters, grid=grid, warps=warps)
        ok = int(counter[0]) == (args.iters + 1) * grid and bool(jnp.all(out == args.iters))
        base = seconds(lambda: run(iters=0, grid=grid, warps=warps))
        full = seconds(lambda: run(iters=args.iters, grid=grid, warps=warps))
        print(f"grid {grid:4d} warps {warps}: {1e6 * (full - base) / args.iters:6.2f} us a barrier "
              f"(call with none {1e6 * base:6.1f} us), counts and visibility {'ok' if ok else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
