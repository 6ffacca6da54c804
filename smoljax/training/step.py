"""The train step: a pure function `(state, frozen, batch) -> (state, metrics)` for `jax.jit`.

The model's parameters come in two parts with disjoint top-level keys:

- `state.params`, the trained part, kept in f32 (the master weights) and updated by the optimizer;
- `frozen`, never differentiated (a frozen vision tower, or the whole base model under LoRA), kept in any dtype.

A trained key `"lora"` holds LoRA adapters, merged into the assembled model on the fly. Full fine-tuning trains
everything (`frozen = {}`); LoRA trains `{"lora": adapters}` against the frozen base.

Mixed precision: the assembled parameters are cast to `compute_dtype` for the forward and backward passes; the
gradients arrive in f32 through the cast, and the loss and softmax run in f32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smoljax.config import LlamaConfig, VLMConfig
from smoljax.errors import ConfigError
from smoljax.models.smollm2 import REMAT_POLICIES
from smoljax.params import cast_params
from smoljax.training.loss import LossSums, lm_loss_sums

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(NamedTuple):
    """Everything a step updates. step: optimizer steps taken (skipped ones included); skipped: how many the
    NaN/inf guard skipped; params: trained f32 parameters; opt_state: optax state; rng: a uint32[2] PRNG key."""

    step: jax.Array
    skipped: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a step computes: precision, rematerialisation, attention, loss chunking, z-loss and accumulation."""

    compute_dtype: str = "bfloat16"
    remat: str = "full"
    attn_impl: str = "auto"
    loss_chunk: int = 2048
    z_loss_weight: float = 0.0
    accum_steps: int = 1
    packed: bool = True  # False: rows hold one document each (padding at the end) -> causal-only attention
    unroll_layers: bool = False  # a Python loop over the layers instead of lax.scan (longer compile)

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("loss_chunk", "accum_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        weight = self.z_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ConfigError(f"z_loss_weight must be a finite number >= 0, got {weight!r}")


def assemble_params(trained: dict, frozen: dict, lora: Any = None) -> dict:
    """The whole model's parameters from the trained and frozen parts; LoRA adapters (trained["lora"]) are merged
    into the text decoder (`frozen["text"]` for SmolVLM2, else the base itself)."""
    params = {**frozen, **{key: value for key, value in trained.items() if key != "lora"}}
    if "lora" not in trained:
        return params
    from smoljax.training.lora import apply_lora
    if "text" in params:
        return {**params, "text": apply_lora(params["text"], trained["lora"], lora)}
    return apply_lora(params, trained["lora"], lora)


def init_state(trained: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh state: step 0, f32 copies of the trained parameters, the optimizer's initial state."""
    # Copies, never aliases of the caller's arrays: the jitted step donates the state's buffers.
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trained)
    return TrainState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.PRNGKey(seed))


def global_norm(tree: Any) -> jax.Array:
    """The f32 L2 norm of all leaves together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def split_microbatches(batch: dict[str, Any], accum_steps: int) -> dict[str, Any]:
    """Every array [N, ...] -> [accum_steps, N / accum_steps, ...] (rows, or image tiles, split evenly)."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ConfigError(f"a batch array with leading size {x.shape[0]} does not split into accum_steps="
                              f"{accum_steps} equal micro-batches; make the batch size a multiple of it")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return jax.tree.map(split, batch)


def make_train_step(config: LlamaConfig | VLMConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, options: StepOptions = StepOptions(),
                    lora: Any = None) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """Builds `train_step(state, frozen, batch) -> (state, metrics)`; wrap it in `jax.jit` (donate `state`).

    The gradient is that of the mean loss over every trained token of the whole batch, however it is split into
    `accum_steps` micro-batches. When the loss or the gradient norm is not finite, the update is skipped: params and
    optimizer state stay as they were, and `metrics["skipped"]` is 1.
    metrics: loss (mean cross-entropy), z_loss (mean log Z^2), objective, grad_norm (before clipping), lr, tokens
    (trained tokens in the batch), skipped.
    """
    compute_dtype = COMPUTE_DTYPES[options.compute_dtype]

    def objective_sum(trained, frozen, micro_batch) -> tuple[jax.Array, LossSums]:
        params = cast_params(assemble_params(trained, frozen, lora), compute_dtype)
        sums = lm_loss_sums(params, micro_batch, config, remat=options.remat, attn_impl=options.attn_impl,
                            chunk_size=options.loss_chunk, segment_mask=options.packed,
                            unroll=options.unroll_layers)
        return sums.cross_entropy + options.z_loss_weight * sums.z_loss, sums

    grad_of_sum = jax.value_and_grad(objective_sum, has_aux=True)

    def summed_gradients(trained, frozen, batch) -> tuple[jax.Array, LossSums, Any]:
        if options.accum_steps == 1:
            (total, sums), grads = grad_of_sum(trained, frozen, batch)
            return total, sums, grads

        def accumulate(carry, micro_batch):
            (total, sums), grads = grad_of_sum(trained, frozen, micro_batch)
            return jax.tree.map(jnp.add, carry, (total, sums, grads)), None

        zeros = (jnp.zeros((), jnp.float32), LossSums(*(jnp.zeros((), jnp.float32),) * 3),
                 jax.tree.map(jnp.zeros_like, trained))
        (total, sums, grads), _ = jax.lax.scan(accumulate, zeros, split_microbatches(batch, options.accum_steps))
        return total, sums, grads

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        total, sums, grads = summed_gradients(state.params, frozen, batch)
        tokens = jnp.maximum(sums.tokens, 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jnp.where(finite, new, old)

        skipped = (~finite).astype(jnp.int32)
        metrics = {
            "loss": sums.cross_entropy / tokens,
            "z_loss": sums.z_loss / tokens,
            "objective": total / tokens,
            "grad_norm": grad_norm,
            "lr": schedule(state.step - state.skipped),
            "tokens": sums.tokens,
            "skipped": skipped,
        }
        new_state = TrainState(
            step=state.step + 1,
            skipped=state.skipped + skipped,
            params=jax.tree.map(keep_if_finite, new_params, state.params),
            opt_state=jax.tree.map(keep_if_finite, new_opt_state, state.opt_state),
            rng=jax.random.split(state.rng)[0],
        )
        return new_state, metrics

    return train_step


def make_eval_step(config: LlamaConfig | VLMConfig, options: StepOptions = StepOptions(),
                   lora: Any = None) -> Callable[[dict, dict, dict], LossSums]:
    """`eval_step(trained, frozen, batch) -> LossSums` in the step's precision, for validation losses."""
    compute_dtype = COMPUTE_DTYPES[options.compute_dtype]

    def eval_step(trained, frozen, batch):
        params = cast_params(assemble_params(trained, frozen, lora), compute_dtype)
        return lm_loss_sums(params, batch, config, attn_impl=options.attn_impl, chunk_size=options.loss_chunk,
                            segment_mask=options.packed)

    return eval_step


def metrics_to_host(metrics: dict) -> dict[str, float]:
    """Device scalars -> Python floats/ints (one transfer), for logging."""
    host = jax.device_get(metrics)
    return {key: (int(value) if np.issubdtype(np.asarray(value).dtype, np.integer) else float(value))
            for key, value in host.items()}


def state_shardings(state: TrainState, trained_specs: Any, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> TrainState:
    """The NamedSharding of every leaf of `state`: parameters from their specs' logical axes (FSDP / tensor
    rules in `smoljax.sharding`), optimizer moments like their parameters, counters and the key replicated."""
    from smoljax.sharding import optimizer_state_shardings, param_shardings

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = param_shardings(trained_specs, mesh)
    return TrainState(replicated, replicated, params,
                      optimizer_state_shardings(optimizer, state.opt_state, params, mesh), replicated)
