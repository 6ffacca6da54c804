"""Child processes for tests/test_training.py: work that needs a fresh interpreter.

    python tests/training_sharded_child.py sharded INPUT.npz OUT_DIR
        On 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before jax is imported):
        trains the tiny model from INPUT.npz's parameters on its batch for SHARDED_STEPS steps on each mesh of
        MESHES (the steps compile in two background threads), checkpoints the fsdp=8 state and restores it onto
        data=4 x tensor=2, onto one device and with a mismatched shape, collects the sharding errors, and writes
        OUT_DIR/result.json (losses, shard shapes, sharding checks, restores, error messages) and
        OUT_DIR/params_<mesh>.npz (the parameters after the steps). The test process compares them with its own
        single-device run.

    python tests/training_sharded_child.py interrupted-save CKPT_DIR
        Saves a small state at step 1 (and waits), starts an async save of a ~200 MB state at step 2, and SIGKILLs
        itself as soon as step 2's directory appears, i.e. while orbax is still writing it in the background.

The test module imports the shared settings below (the tiny config, optimizer, step options, meshes), so both
processes train exactly the same thing. Nothing here asserts: the test process does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "sharded":
    # Must happen before jax is imported: the CPU backend reads it once, when it starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np

import jax
import jax.numpy as jnp

from smoljax.config import LlamaConfig
from smoljax.errors import SmolJaxError
from smoljax.params import llama_specs
from smoljax.training.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from smoljax.training.step import StepOptions, TrainState, init_state, make_train_step, state_shardings

# ---- settings shared with tests/test_training.py ---------------------------------------------------------------------

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32")
TINY_UNTIED = TINY.replace(tie_word_embeddings=False)
# Warmup then cosine, weight decay and clipping all active; lr 1e-2 so the overfitting test converges in 100 steps.
# eps 1e-6 rather than 1e-8: Adam's m / (sqrt(v) + eps) turns a rounding difference dg in a near-zero gradient g into
# an update difference of lr * dg / (|g| + eps); with eps 1e-8 the few entries whose gradient is ~1e-8 moved by up
# to 1e-4 between two summation orders after 6 steps, with 1e-6 by at most ~3e-6 (see test_training.py).
OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=5, decay="cosine", min_lr_ratio=0.1, weight_decay=0.1,
                            b1=0.9, b2=0.95, eps=1e-6, max_grad_norm=1.0)
TOTAL_STEPS = 100
# f32 so that runs compare at rounding level; loss_chunk 64 < the 128 tokens of a batch, so the chunk loop runs.
STEP_OPTIONS = StepOptions(compute_dtype="float32", remat="none", loss_chunk=64, z_loss_weight=1e-4, accum_steps=1)
SHARDED_STEPS = 6
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp4_tensor2": dict(fsdp=4, tensor=2),
    "data4_tensor2": dict(data=4, tensor=2),
}
# LLVM -O0 for every jit of the tests: on a 2-core CPU it halves compile time, which is nearly all of these tests'
# time. It changes how XLA's kernels are turned into machine code, not the HLO (what is computed, in which order).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def flatten(tree) -> dict[str, np.ndarray]:
    """{"layers/q_proj": array, ...}: a parameter tree as flat host arrays (for npz files)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf) for path, leaf in leaves}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = jnp.asarray(value)
    return tree


def adam_moments(opt_state) -> list:
    """The (mu, nu) parameter-shaped trees of every ScaleByAdamState inside an optax state."""
    import optax

    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    return [tree for s in states for tree in (s.mu, s.nu)]


# ---- sharded training -----------------------------------------------------------------------------------------------

def _error(fn) -> dict:
    try:
        value = fn()
    except SmolJaxError as error:
        return {"type": type(error).__name__, "message": str(error)}
    except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
        return {"type": type(error).__name__, "message": str(error), "unexpected": True}
    return {"type": None, "value": repr(value)}


def run_sharded(input_path: str, out_dir: str) -> None:
    from smoljax.sharding import batch_sharding, check_batch_divides, make_mesh, param_shardings
    from smoljax.training.checkpoint import Checkpointer, abstract_like

    data = np.load(input_path)
    params = unflatten({k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")})
    batch = {k[len("batch/"):]: data[k] for k in data.files if k.startswith("batch/")}
    specs = llama_specs(TINY)
    optimizer = make_optimizer(OPTIMIZER, TOTAL_STEPS)
    train_step = make_train_step(TINY, optimizer, lr_schedule(OPTIMIZER, TOTAL_STEPS), STEP_OPTIONS)
    result: dict = {"device_count": jax.device_count(), "meshes": {}}
    step_fns, meshes, plans = {}, {}, {}
    saved_host = None
    for name, axes in MESHES.items():
        mesh = meshes[name] = make_mesh(**axes)
        check_batch_divides(batch["tokens"].shape[0], mesh)
        fresh = init_state(params, optimizer)
        shardings = state_shardings(fresh, specs, optimizer, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step = step_fns[name] = jit(train_step, donate_argnums=0, out_shardings=(shardings, replicated))
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
                          for k, v in batch.items()}
        plans[name] = (mesh, shardings, step, abstract_like(fresh, shardings), abstract_batch)
    # Compile every mesh's step in two background threads (XLA releases the GIL), then run them in turn.
    pool = ThreadPoolExecutor(max_workers=2)
    compiling = {name: pool.submit(lambda plan=plan: plan[2].lower(plan[3], {}, plan[4]).compile())
                 for name, plan in plans.items()}
    for name in MESHES:
        compiling[name].result()
        mesh, shardings, step, _, _ = plans[name]
        state = jax.device_put(init_state(params, optimizer), shardings)
        global_batch = jax.device_put(batch, batch_sharding(mesh))
        losses, grad_norms = [], []
        for _ in range(SHARDED_STEPS):
            state, metrics = step(state, {}, global_batch)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
        np.savez(os.path.join(out_dir, f"params_{name}.npz"), **flatten(state.params))
        moments = adam_moments(state.opt_state)
        result["meshes"][name] = {
            "mesh_shape": dict(mesh.shape),
            "losses": losses,
            "grad_norms": grad_norms,
            "param_shard_shapes": {k: list(v.addressable_shards[0].data.shape)
                                   for k, v in _flat_arrays(state.params).items()},
            "param_specs": {k: [list(p) if isinstance(p, tuple) else p for p in v.sharding.spec]
                            for k, v in _flat_arrays(state.params).items()},
            "moment_shard_shapes": [{k: list(v.addressable_shards[0].data.shape)
                                     for k, v in _flat_arrays(m).items()} for m in moments],
            "moments_like_params": all(
                m.sharding == p.sharding for tree in moments
                for m, p in zip(jax.tree.leaves(tree), jax.tree.leaves(state.params))),
            "state_has_requested_shardings": all(
                leaf.sharding.is_equivalent_to(want, leaf.ndim)
                for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))),
            "batch_shard_shape": list(global_batch["tokens"].addressable_shards[0].data.shape),
        }
        if name == "fsdp8":
            # Checkpoint the fsdp=8 state, then take one more step: the restore on other meshes must continue the
            # same run (same values bit for bit, same next loss).
            checkpointer = Checkpointer(os.path.join(out_dir, "ckpt"), keep=2, async_save=True)
            checkpointer.save(SHARDED_STEPS, state, {"position": SHARDED_STEPS})
            checkpointer.wait()
            saved_host = jax.device_get(state)
            state, metrics = step(state, {}, global_batch)
            result["fsdp8_next_loss"] = float(metrics["loss"])

    pool.shutdown()

    # Restore the fsdp=8 checkpoint onto data=4 x tensor=2 and onto one device.
    restores = {}
    targets = {
        "data4_tensor2": state_shardings(saved_host, specs, optimizer, meshes["data4_tensor2"]),
        "single_device": jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), saved_host),
    }
    for target, shardings in targets.items():
        restored, data_state = checkpointer.restore(abstract_like(saved_host, shardings))
        entry = {
            "data_state": data_state,
            "is_train_state": isinstance(restored, TrainState),
            "bitwise_equal": all(np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(np.asarray(a),
                                                                                                 np.asarray(b))
                                 for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved_host))),
            "has_requested_shardings": all(
                leaf.sharding.is_equivalent_to(want, leaf.ndim)
                for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings))),
            "embed_shard_shape": list(restored.params["embed"].addressable_shards[0].data.shape),
        }
        if target == "data4_tensor2":
            mesh = meshes[target]
            _, metrics = step_fns[target](restored, {}, jax.device_put(batch, batch_sharding(mesh)))
            entry["next_loss"] = float(metrics["loss"])
        restores[target] = entry
    # A restore whose shapes do not match (embed one column wider) must fail cleanly. Done here rather than in the
    # test process: orbax abandons the other arrays' reads of such a restore, and reports them when they are
    # garbage-collected, at exit.
    wider = saved_host._replace(params={**saved_host.params, "embed": np.zeros((256, 65), np.float32)})
    restores["wider_embed"] = _error(lambda: checkpointer.restore(abstract_like(wider, targets["single_device"])))
    checkpointer.close()
    result["restores"] = restores

    devices = jax.devices()
    result["errors"] = {
        # 4 query heads over tensor=3; 2 kv heads over tensor=4 (4 query heads would split); the whole tree over 3.
        "heads_do_not_divide": _error(lambda: param_shardings({"q_proj": specs["layers"]["q_proj"]},
                                                              make_mesh(tensor=3, devices=devices[:3]))),
        "kv_heads_do_not_divide": _error(lambda: param_shardings(specs, make_mesh(data=2, tensor=4))),
        "model_does_not_divide": _error(lambda: param_shardings(specs, make_mesh(tensor=3, devices=devices[:3]))),
        "batch_does_not_divide": _error(lambda: check_batch_divides(12, make_mesh(data=2, fsdp=4))),
        "accum_batch_does_not_divide": _error(lambda: check_batch_divides(16, make_mesh(data=2, fsdp=2, tensor=2),
                                                                          accum_steps=8)),
        "fill_does_not_divide": _error(lambda: make_mesh(fsdp=3, tensor=-1)),
        "fill_ok": _error(lambda: dict(make_mesh(data=-1, tensor=2).shape)),
    }
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


def _flat_arrays(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


# ---- a save killed part-way -----------------------------------------------------------------------------------------

BIG_STATE_FLOATS = 50_000_000  # 200 MB of f32: orbax needs far longer than a kill to write it


def small_state() -> TrainState:
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), "norm": jnp.ones((32,), jnp.float32)}
    return TrainState(jnp.int32(1), jnp.int32(0), params, (jnp.zeros((64, 32)), jnp.zeros((32,))),
                      jax.random.PRNGKey(7))


def big_state() -> TrainState:
    rng = np.random.default_rng(2)  # random values: nothing to compress, so the write really takes its time
    params = {"w": jnp.asarray(rng.standard_normal(BIG_STATE_FLOATS, np.float32)), "norm": jnp.ones((32,))}
    return TrainState(jnp.int32(2), jnp.int32(0), params, (jnp.zeros((64, 32)), jnp.zeros((32,))),
                      jax.random.PRNGKey(8))


def _wait_for_step_directory(directory: str, step: int, timeout_s: float) -> bool:
    """Polls until `directory` holds step's final directory or orbax's temporary one (`<step>.orbax-...-tmp...`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(name == str(step) or name.startswith(f"{step}.") for name in os.listdir(directory)):
            return True
        time.sleep(0.001)
    return False


def run_interrupted_save(directory: str) -> None:
    from smoljax.training.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, keep=3, async_save=True)
    checkpointer.save(1, small_state(), {"position": 1})
    checkpointer.wait()
    state = big_state()
    jax.block_until_ready(state)
    checkpointer.save(2, state, {"position": 2})
    # `save` has returned: the arrays are copied and orbax writes them in a background thread, which may not have
    # created step 2's temporary directory yet. Wait until it (or, if the write already won, the final directory)
    # exists, so the kill lands mid-write; note which; then die without any cleanup, as a preempted job would.
    started = _wait_for_step_directory(directory, 2, timeout_s=120)
    finished = os.path.isdir(os.path.join(directory, "2"))
    with open(os.path.join(os.path.dirname(os.path.abspath(directory)), "kill_marker.json"), "w") as f:
        json.dump({"step2_started_before_kill": started, "step2_complete_before_kill": finished}, f)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sharded":
        run_sharded(sys.argv[2], sys.argv[3])
    elif mode == "interrupted-save":
        run_interrupted_save(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
