"""Training pieces: the chunked loss, the train step, the optimizer, sharded training and train-state checkpoints.

What is tested, on a tiny random SmolLM2 (2 layers, hidden 64, vocab 256; tied and untied embeddings):

- loss: `lm_loss_sums` against the cross-entropy of `smollm2.forward`'s logits through `jax.nn.log_softmax`; chunk
  sizes that divide B*T, do not divide it, equal it or exceed it; the z-loss against mean(logsumexp(logits)^2);
  masked positions contribute nothing; `targets_from_labels` against a numpy re-implementation of transformers'
  `ForCausalLMLoss` (shift left, ignore -100, mean over the rest); two packed documents against the same documents in
  separate rows; the gradient of the chunked loss against that of the unchunked reference, under every remat policy;
- train step: accum_steps 1, 2 and 4 give the same metrics and parameters; bf16 compute keeps f32 master weights;
  the model overfits one batch; the NaN/inf guard (a frozen embedding row that is inf, and a batch with a NaN loss
  weight) skips the update bit for bit and does not advance the schedule; the lr metric follows warmup + cosine;
  weight decay reaches matrices, not norms; a frozen part stays frozen;
- sharding, in a child process with 8 CPU devices: meshes data=8, fsdp=8, data=2 x fsdp=2 x tensor=2,
  fsdp=4 x tensor=2 and data=4 x tensor=2 train like one device, parameters and Adam moments are really sharded,
  a checkpoint written on fsdp=8 restores onto data=4 x tensor=2 and onto one device;
- errors: bad meshes, batches, step options and optimizer configs give a one-line ConfigError (NaN/inf and
  out-of-range hyperparameters included); checkpoints that do not match (another tree, or, in the
  child, another shape) or are missing give CheckpointError;
- checkpoints: bitwise round trip (params, optimizer state, step, rng, data position), keep-N, and a save SIGKILLed
  part-way leaves the previous checkpoint usable.

Tolerances. f32 unless said otherwise; losses are ~5.5 (about ln 256), gradients ~1e-2, parameters ~4e-2. Observed
differences are from this module's runs.
- Same computation, another summation order: chunk sizes, gradient accumulation, remat policies. 1e-6 relative on
  losses and z-losses (observed <= 2.4e-7), 1e-6 of a leaf's largest entry on gradients (remat: bitwise in
  practice), 1e-5 relative on the global gradient norm (observed 1.5e-7). Not bitwise, because XLA adds per-chunk or
  per-micro-batch partial sums in another order than one big reduction, and f32 addition (epsilon 6e-8) is not
  associative; over 64-128 tokens that is worth ~1e-7 relative.
- Against a reference computed another way (log_softmax of the full [B, T, V] logits instead of per-chunk logits; the
  float64 numpy HF loss and z-loss; the same documents in separate rows, whose attention is computed over other
  shapes): 1e-5 relative on losses, 1e-5 of a leaf's largest entry on gradients (observed <= 3e-7).
- Sharded runs against one device: 1e-5 relative on the 6 per-step losses and gradient norms (observed <= 4e-7):
  each shard reduces its rows, then the partial sums are all-reduced, another summation order again.
- Parameters after 6 Adam steps (accumulation and sharding against one device): 1e-5 absolute (observed <= 3e-6),
  i.e. 1e-3 of one update at lr 1e-2, so a missing or doubled gradient contribution cannot hide. Adam turns a
  rounding difference dg of a near-zero gradient g into lr * dg / (|g| + eps): with eps 1e-8 a few entries (0.3%)
  moved by up to 1e-4; these tests use eps 1e-6 (the shared OPTIMIZER in the child module), which bounds that.
- bf16 compute against f32: 1e-3 relative on the first loss (observed 5e-5: at random init the loss is dominated by
  log Z ~ ln 256, which bf16 matmuls barely move, while a loss computed in bf16 itself would be ~4e-3 off).
- Skipped updates, masked targets, frozen parameters, checkpoints and resharded restores: bit for bit.

Runtime. Compiling is nearly all of this module's time on CPU. Every jit uses LLVM -O0 (`FAST_COMPILE` in the child
module: half the compile time, same HLO), each compiled function serves several tests, the compiles run in two
background threads (XLA releases the GIL) started with the module, and the 8-device child runs meanwhile. About
110 CPU-seconds in all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import training_sharded_child as child
from smoljax.errors import CheckpointError, ConfigError
from smoljax.models import smollm2
from smoljax.models.smollm2 import REMAT_POLICIES
from smoljax.params import init_params, is_spec, llama_specs
from smoljax.sharding import check_batch_divides, make_mesh
from smoljax.training.checkpoint import Checkpointer, abstract_like
from smoljax.training.data import pack_documents
from smoljax.training.loss import IGNORE_INDEX, LossSums, lm_loss_sums, mean_loss, targets_from_labels
from smoljax.training.optimizer import OptimizerConfig, decay_mask, lr_schedule, make_optimizer
from smoljax.training.step import (StepOptions, TrainState, assemble_params, init_state, make_train_step,
                                   metrics_to_host, split_microbatches)

TINY, TINY_UNTIED = child.TINY, child.TINY_UNTIED
CONFIGS = {"tied": TINY, "untied": TINY_UNTIED}
OPTIMIZER, TOTAL_STEPS, STEP_OPTIONS = child.OPTIMIZER, child.TOTAL_STEPS, child.STEP_OPTIONS
OPT = make_optimizer(OPTIMIZER, TOTAL_STEPS)
SCHEDULE = lr_schedule(OPTIMIZER, TOTAL_STEPS)
jit = child.jit

RTOL_ORDER = 1e-6      # same computation, another summation order
RTOL_REFERENCE = 1e-5  # against a reference computed another way
RTOL_GRAD_NORM = 1e-5  # a norm over 1e5 gradient entries, each with its own rounding
ATOL_PARAMS = 1e-5     # parameters after several Adam steps
RTOL_BF16 = 1e-3       # the first loss in bf16 compute against f32
CHILD = Path(__file__).with_name("training_sharded_child.py")


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "errors must be one line"
    return message


def host(tree):
    """A host copy (numpy) of a tree: what a state was before a jitted step donates its buffers."""
    return jax.tree.map(np.array, jax.device_get(tree))


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- data -----------------------------------------------------------------------------------------------------------

def document(rng: np.random.Generator, length: int, prompt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids in 1..255 (0 is kept out: the NaN-guard test poisons its embedding row); the first `prompt` tokens
    are not trained as targets."""
    ids = rng.integers(1, 256, length).astype(np.int32)
    mask = np.arange(length) >= prompt
    return ids, mask


def empty_rows(count: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows of padding only (segment 0, nothing trained), as the data pipeline fills a batch's last rows."""
    dtypes = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
              "positions": np.int32}
    return {key: np.zeros((count, seq_len), dtype) for key, dtype in dtypes.items()}


def concat_rows(*batches) -> dict[str, np.ndarray]:
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


_rng = np.random.default_rng(0)
DOC_A, DOC_B = document(_rng, 14), document(_rng, 17, prompt=4)
DOC_C = document(_rng, 33, prompt=10)
# Loss batches, all [2, 32] so one compiled function serves them: row 0 packs A and B (13 + 16 slots, 3 padding),
# row 1 is one 33-token document whose first 10 tokens are a prompt.
LOSS_BATCH = concat_rows(pack_documents([DOC_A, DOC_B], 32), pack_documents([DOC_C], 32))
PACKED = concat_rows(pack_documents([DOC_A, DOC_B], 32), empty_rows(1, 32))
SEPARATE = pack_documents([DOC_A, DOC_B], 32, pack=False)
# Training batches, [8, 16] (rows divide over data x fsdp = 8): TRAIN is 8 rows of plain next-token prediction;
# RAGGED packs documents of 3..24 tokens with prompts, so rows and micro-batches have different token counts.
_train_ids = _rng.integers(1, 256, (8, 17)).astype(np.int32)
TRAIN = {"tokens": _train_ids[:, :-1], "targets": _train_ids[:, 1:], "loss_mask": np.ones((8, 16), np.float32),
         "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
RAGGED = {key: value[:8] for key, value in pack_documents(
    [document(_rng, int(n), prompt=int(p)) for n, p in zip(_rng.integers(3, 25, 40), _rng.integers(0, 3, 40))],
    16).items()}
assert RAGGED["tokens"].shape == (8, 16) and len(set(RAGGED["loss_mask"].sum(axis=1))) > 2


# ---- parameters and compiled functions ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def params() -> dict:
    """Random f32 parameters for the tied and untied configs (`init_params` under jit: one compile)."""
    out = {}
    for name, config in CONFIGS.items():
        specs = llama_specs(config)
        out[name] = jax.device_get(jit(lambda key, specs=specs: init_params(specs, key))(jax.random.PRNGKey(0)))
    return out


CHUNKS = (7, 16, 64, 1000)  # B*T = 64: not dividing, dividing, equal, larger
UNROLLED = "dots_attention, layers unrolled"  # StepOptions.unroll_layers: a Python loop instead of the scan


def _loss_outputs(params, batch, config):
    """Forward logits, the log_softmax reference CE sum, and `lm_loss_sums` at every chunk size: one compile."""
    logits = smollm2.forward(params, batch["tokens"], config, segment_ids=batch["segment_ids"],
                             positions=batch["positions"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    reference = -jnp.sum(target_log_probs * batch["loss_mask"])
    return logits, reference, {chunk: lm_loss_sums(params, batch, config, chunk_size=chunk) for chunk in CHUNKS}


def _all_grads(params, batch):
    """value_and_grad of the mean CE: the log_softmax reference and the chunked loss (chunk 7) under every remat."""
    def reference(p):
        logits = smollm2.forward(p, batch["tokens"], TINY, segment_ids=batch["segment_ids"],
                                 positions=batch["positions"])
        target = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), batch["targets"][..., None], axis=-1)
        return -jnp.sum(target[..., 0] * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    def chunked(p, remat, unroll=False):
        sums = lm_loss_sums(p, batch, TINY, remat=remat, chunk_size=7, unroll=unroll)
        return sums.cross_entropy / sums.tokens

    out = {"reference": jax.value_and_grad(reference)(params)}
    for remat in REMAT_POLICIES:
        out[remat] = jax.value_and_grad(functools.partial(chunked, remat=remat))(params)
    out[UNROLLED] = jax.value_and_grad(functools.partial(chunked, remat="dots_attention", unroll=True))(params)
    return out


_LOSS_OUTPUTS = jit(_loss_outputs, static_argnames="config")
_ALL_GRADS = jit(_all_grads)
BF16_OPTIONS = dataclasses.replace(STEP_OPTIONS, compute_dtype="bfloat16", remat="full")  # StepOptions' defaults
ACCUM_OPTIONS = {accum: dataclasses.replace(STEP_OPTIONS, accum_steps=accum) for accum in (2, 4)}


@functools.lru_cache(maxsize=None)
def _step_fn(config, options):
    return jit(make_train_step(config, OPT, SCHEDULE, options), donate_argnums=0)


# Compiles started in background threads by the `background` fixture (XLA releases the GIL while it compiles), so
# the compiles overlap each other and the tests. Each entry is waited for before its function is first called; the
# call then finds the executable in the jit's cache.
_COMPILING: dict = {}


def _ready(key):
    if key in _COMPILING:
        _COMPILING[key].result()


def step_fn(config=TINY, options=STEP_OPTIONS):
    """The jitted train step as the trainer builds it (state donated), one compile per (config, options)."""
    _ready(("step", config, options))
    return _step_fn(config, options)


def loss_outputs(params, batch, config):
    _ready(("loss", config))
    logits, reference, sums = _LOSS_OUTPUTS(params, batch, config=config)
    return np.asarray(logits, np.float64), float(reference), {c: jax.tree.map(float, s) for c, s in sums.items()}


@pytest.fixture(scope="module")
def grads(params) -> dict:
    _ready("grads")
    return jax.device_get(_ALL_GRADS(params["tied"], LOSS_BATCH))


def state_shape(trained) -> TrainState:
    return jax.eval_shape(lambda: init_state(trained, OPT))


def run_steps(step, state, batches, frozen=None):
    """Runs the batches in order; returns the final state and each step's metrics as Python numbers."""
    history = []
    for batch in batches:
        state, metrics = step(state, {} if frozen is None else frozen, batch)
        history.append(metrics_to_host(metrics))
    return state, history


def split_frozen(params: dict, frozen_keys=("embed",)) -> tuple[dict, dict]:
    trained = {k: v for k, v in params.items() if k not in frozen_keys}
    return trained, {k: v for k, v in params.items() if k in frozen_keys}


# ---- child processes (started first: they run while the other tests do) ---------------------------------------------

class Child:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=CHILD.parent.parent)

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def background(params, tmp_path_factory, request):
    """Starts the child processes that the selected tests need (the 8-device sharded run, the SIGKILLed save) and
    the compiles, in the order the tests use them."""
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    needed = set().union(*(item.fixturenames for item in selected))
    work = tmp_path_factory.mktemp("training_children")
    running = {"work": work}
    if "sharded_result" in needed:
        np.savez(work / "input.npz", **{f"param/{k}": v for k, v in child.flatten(params["tied"]).items()},
                 **{f"batch/{k}": v for k, v in RAGGED.items()})
        (work / "sharded").mkdir()
        running["sharded"] = Child(["sharded", str(work / "input.npz"), str(work / "sharded")], work / "sharded.log")
    if "interrupted_save" in needed:
        (work / "interrupted").mkdir()
        running["interrupted"] = Child(["interrupted-save", str(work / "interrupted" / "ckpt")],
                                       work / "interrupted.log")
    tied, untied = params["tied"], params["untied"]

    def step_job(config, options, trained, frozen):
        return lambda: _step_fn(config, options).lower(state_shape(trained), frozen, TRAIN).compile()

    trained, frozen = split_frozen(untied)
    jobs = {
        ("loss", TINY): lambda: _LOSS_OUTPUTS.lower(tied, LOSS_BATCH, config=TINY).compile(),
        ("loss", TINY_UNTIED): lambda: _LOSS_OUTPUTS.lower(untied, LOSS_BATCH, config=TINY_UNTIED).compile(),
        "grads": lambda: _ALL_GRADS.lower(tied, LOSS_BATCH).compile(),
        ("step", TINY, STEP_OPTIONS): step_job(TINY, STEP_OPTIONS, tied, {}),
        **{("step", TINY, options): step_job(TINY, options, tied, {}) for options in ACCUM_OPTIONS.values()},
        ("step", TINY, BF16_OPTIONS): step_job(TINY, BF16_OPTIONS, tied, {}),
        ("step", TINY_UNTIED, STEP_OPTIONS): step_job(TINY_UNTIED, STEP_OPTIONS, trained, frozen),
    }
    if "grads" not in needed:
        del jobs["grads"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        _COMPILING.update({key: pool.submit(job) for key, job in jobs.items()})
        yield running
        for future in _COMPILING.values():  # unstarted compiles of deselected tests
            future.cancel()
        _COMPILING.clear()
        for proc in running.values():
            if isinstance(proc, Child):
                proc.stop()


@pytest.fixture(scope="module")
def sharded_result(background) -> dict:
    proc = background["sharded"]
    assert proc.wait() == 0, f"the sharded child failed:\n{proc.log_tail()}"
    return json.loads((background["work"] / "sharded" / "result.json").read_text())


@pytest.fixture(scope="module")
def interrupted_save(background) -> tuple[Child, Path]:
    return background["interrupted"], background["work"] / "interrupted"


# ==== 1. loss =========================================================================================================

@pytest.mark.parametrize("name", CONFIGS)
def test_loss_is_the_log_softmax_cross_entropy_of_forward_logits(params, name):
    _, reference, sums = loss_outputs(params[name], LOSS_BATCH, CONFIGS[name])
    tokens = LOSS_BATCH["loss_mask"].sum()
    assert sums[64].tokens == tokens == 13 + 13 + 23  # A: 13 targets; B: 16 minus 3 in the prompt; C: 32 minus 9
    np.testing.assert_allclose(sums[64].cross_entropy / tokens, reference / tokens, rtol=RTOL_REFERENCE)
    assert 4.5 < reference / tokens < 6.5  # ~ln(256): a random model, and a meaningful comparison


@pytest.mark.parametrize("name", CONFIGS)
def test_chunk_size_does_not_change_the_sums(params, name):
    _, _, sums = loss_outputs(params[name], LOSS_BATCH, CONFIGS[name])
    for chunk in CHUNKS:
        assert sums[chunk].tokens == sums[64].tokens
        np.testing.assert_allclose(sums[chunk].cross_entropy, sums[64].cross_entropy, rtol=RTOL_ORDER)
        np.testing.assert_allclose(sums[chunk].z_loss, sums[64].z_loss, rtol=RTOL_ORDER)


@pytest.mark.parametrize("name", CONFIGS)
def test_z_loss_is_the_mean_squared_log_partition_function(params, name):
    logits, _, sums = loss_outputs(params[name], LOSS_BATCH, CONFIGS[name])
    top = logits.max(axis=-1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]
    mask = LOSS_BATCH["loss_mask"]
    expected = (log_z ** 2 * mask).sum() / mask.sum()
    for chunk in CHUNKS:
        np.testing.assert_allclose(sums[chunk].z_loss / sums[chunk].tokens, expected, rtol=RTOL_REFERENCE)
    # mean_loss: the objective, (cross-entropy + weight * z-loss) / tokens.
    np.testing.assert_allclose(float(mean_loss(LossSums(*map(jnp.float32, sums[64])), 1e-4)),
                               (sums[64].cross_entropy + 1e-4 * sums[64].z_loss) / sums[64].tokens, rtol=RTOL_ORDER)
    assert float(mean_loss(LossSums(*map(jnp.float32, (0.0, 0.0, 0.0))))) == 0.0  # no trained token: 0, not NaN


def test_masked_positions_do_not_contribute(params):
    logits, _, sums = loss_outputs(params["tied"], LOSS_BATCH, TINY)
    masked = LOSS_BATCH["loss_mask"] == 0
    assert masked.sum() >= 10
    other = dict(LOSS_BATCH, targets=np.where(masked, (LOSS_BATCH["targets"] + 97) % 256, LOSS_BATCH["targets"]))
    _, _, other_sums = loss_outputs(params["tied"], other, TINY)
    assert other_sums == sums  # bit for bit, at every chunk size

    # Unmasking one more position adds exactly that token's cross-entropy (and one token).
    row, col = 1, 3  # inside document C's prompt
    assert masked[row, col]
    unmasked = dict(LOSS_BATCH, loss_mask=np.where((np.arange(2)[:, None] == row) & (np.arange(32) == col), 1.0,
                                                   LOSS_BATCH["loss_mask"]).astype(np.float32))
    _, _, more = loss_outputs(params["tied"], unmasked, TINY)
    token_logits = logits[row, col]
    token_ce = np.log(np.exp(token_logits - token_logits.max()).sum()) + token_logits.max() - token_logits[
        LOSS_BATCH["targets"][row, col]]
    assert more[64].tokens == sums[64].tokens + 1
    # A difference of two f32 sums of ~270: 1e-4 relative to the ~5.5 token term covers their rounding (~3e-5).
    np.testing.assert_allclose(more[64].cross_entropy - sums[64].cross_entropy, token_ce, rtol=1e-4)


def hf_causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """transformers' `ForCausalLMLoss` (reduction "mean", ignore_index -100), in float64 numpy: pad the labels with
    one -100 on the right, shift them left by one, cross-entropy of every position whose label is not -100."""
    labels = np.concatenate([labels, np.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)[:, 1:]
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    top = flat_logits.max(axis=-1)
    log_z = top + np.log(np.exp(flat_logits - top[:, None]).sum(axis=-1))
    picked = flat_logits[np.arange(len(flat_labels)), np.where(keep, flat_labels, 0)]
    return float(((log_z - picked) * keep).sum() / keep.sum())


def test_targets_from_labels_reproduces_hf_shift(params):
    rng = np.random.default_rng(5)
    input_ids = rng.integers(1, 256, (2, 32)).astype(np.int32)
    labels = input_ids.copy()
    labels[0, :6] = IGNORE_INDEX                     # a prompt
    labels[1, 20:] = IGNORE_INDEX                    # right padding...
    input_ids[1, 20:] = 0
    segment_ids = np.ones((2, 32), np.int32)
    segment_ids[1, 20:] = 0                          # ...which attends nowhere
    targets, loss_mask = targets_from_labels(jnp.asarray(labels))
    targets, loss_mask = np.asarray(targets), np.asarray(loss_mask)
    assert targets.dtype == np.int32 and loss_mask.dtype == np.float32
    np.testing.assert_array_equal(loss_mask[:, :-1], labels[:, 1:] != IGNORE_INDEX)
    np.testing.assert_array_equal(targets[:, :-1], np.where(labels[:, 1:] == IGNORE_INDEX, 0, labels[:, 1:]))
    assert not loss_mask[:, -1].any() and not targets[:, -1].any()  # the last position predicts nothing

    batch = {"tokens": input_ids, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
             "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1))}
    logits, _, sums = loss_outputs(params["tied"], batch, TINY)
    assert sums[64].tokens == (labels[:, 1:] != IGNORE_INDEX).sum() == 26 + 19
    np.testing.assert_allclose(sums[64].cross_entropy / sums[64].tokens, hf_causal_lm_loss(logits, labels),
                               rtol=RTOL_REFERENCE)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_documents_give_the_sums_of_separate_runs(params, name):
    assert PACKED["segment_ids"][0].max() == 2 and (SEPARATE["segment_ids"].max(axis=1) == 1).all()
    _, _, packed = loss_outputs(params[name], PACKED, CONFIGS[name])
    _, _, separate = loss_outputs(params[name], SEPARATE, CONFIGS[name])
    assert packed[64].tokens == separate[64].tokens == 26
    np.testing.assert_allclose(packed[64].cross_entropy, separate[64].cross_entropy, rtol=RTOL_REFERENCE)
    np.testing.assert_allclose(packed[64].z_loss, separate[64].z_loss, rtol=RTOL_REFERENCE)

    # The comparison can fail: the same row with one segment (B attending to A) gives another loss.
    leaky = dict(PACKED, segment_ids=np.where(PACKED["segment_ids"] > 0, 1, 0).astype(np.int32),
                 positions=np.where(PACKED["segment_ids"] > 0, np.arange(32), 0).astype(np.int32))
    _, _, crossing = loss_outputs(params[name], leaky, CONFIGS[name])
    assert abs(crossing[64].cross_entropy - packed[64].cross_entropy) > 1e-3 * packed[64].cross_entropy


def test_gradient_of_chunked_loss_matches_unchunked_reference(grads):
    (ref_loss, ref_grads), (loss, chunked_grads) = grads["reference"], grads["none"]
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL_REFERENCE)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(chunked_grads)[0],
                                 jax.tree.leaves(ref_grads)):
        scale = np.abs(want).max()
        assert scale > 0, path
        np.testing.assert_allclose(got, want, rtol=0, atol=RTOL_REFERENCE * scale, err_msg=str(path))


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"] + [UNROLLED])
def test_remat_policies_give_the_same_loss_and_gradients(grads, remat):
    (base_loss, base_grads), (loss, remat_grads) = grads["none"], grads[remat]
    np.testing.assert_allclose(loss, base_loss, rtol=RTOL_ORDER)
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(got, want, rtol=0, atol=RTOL_ORDER * np.abs(want).max())


# ==== 2. train step ===================================================================================================

@pytest.fixture(scope="module")
def overfit_run(params):
    """100 steps of the f32 step on TRAIN (8 x 16 tokens) from fresh parameters: (final state, metrics per step)."""
    return run_steps(step_fn(), init_state(params["tied"], OPT), [TRAIN] * TOTAL_STEPS)


@pytest.fixture(scope="module")
def ragged_run(params):
    """child.SHARDED_STEPS steps on RAGGED with accum_steps 1: the single-device baseline of the sharded runs."""
    return run_steps(step_fn(), init_state(params["tied"], OPT), [RAGGED] * child.SHARDED_STEPS)


def test_tiny_model_overfits_one_batch(overfit_run):
    _, history = overfit_run
    assert history[0]["loss"] > 4.5
    assert history[-1]["loss"] < 0.05, [round(h["loss"], 4) for h in history[::10]]
    assert all(h["skipped"] == 0 and h["tokens"] == 128 for h in history)
    for h in history:
        np.testing.assert_allclose(h["objective"], h["loss"] + STEP_OPTIONS.z_loss_weight * h["z_loss"],
                                   rtol=RTOL_ORDER)


def expected_lr(step: int) -> float:
    """Linear warmup from 0 over 5 steps, then cosine from 1e-2 down to 1e-3 at step 100 (written out by hand)."""
    peak, floor, warmup = OPTIMIZER.learning_rate, OPTIMIZER.learning_rate * OPTIMIZER.min_lr_ratio, 5
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (TOTAL_STEPS - warmup), 1.0)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_lr_metric_follows_warmup_then_cosine(overfit_run):
    _, history = overfit_run
    assert history[0]["lr"] == 0.0
    for step, h in enumerate(history):
        np.testing.assert_allclose(h["lr"], expected_lr(step), rtol=1e-5, atol=1e-9, err_msg=f"step {step}")


def test_lr_schedule_linear_and_constant_decay():
    def values(config, total, steps):
        return np.asarray(jit(jax.vmap(lr_schedule(config, total)))(jnp.asarray(steps)))

    linear = OptimizerConfig(learning_rate=1.0, warmup_steps=2, decay="linear", min_lr_ratio=0.2)
    np.testing.assert_allclose(values(linear, 12, [0, 1, 2, 7, 12, 50]), [0, 0.5, 1, 0.6, 0.2, 0.2], rtol=1e-6,
                               atol=1e-7)
    constant = OptimizerConfig(learning_rate=0.5, warmup_steps=0, decay="constant")
    np.testing.assert_array_equal(values(constant, 10, [0, 5, 20]), [0.5, 0.5, 0.5])


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_gives_the_same_steps(params, ragged_run, accum):
    base_state, base_history = ragged_run
    state, history = run_steps(step_fn(TINY, ACCUM_OPTIONS[accum]), init_state(params["tied"], OPT),
                               [RAGGED] * len(base_history))
    for got, want in zip(history, base_history):
        assert got["tokens"] == want["tokens"] and got["skipped"] == want["skipped"] == 0
        assert got["lr"] == want["lr"]
        for key in ("loss", "z_loss", "objective"):
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL_ORDER, err_msg=key)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=RTOL_GRAD_NORM)
    assert int(state.step) == int(base_state.step)
    assert max_abs_diff(state.params, base_state.params) < ATOL_PARAMS
    assert max_abs_diff(state.params, params["tied"]) > 1e-3  # they did train


def test_micro_batches_have_different_token_counts():
    """Guards the accumulation test: averaging per micro-batch instead of over the whole batch would differ."""
    for accum in (2, 4):
        counts = split_microbatches(RAGGED, accum)["loss_mask"].sum(axis=(1, 2))
        assert len(set(counts.tolist())) > 1, counts


def test_bf16_compute_keeps_f32_master_params(params, overfit_run):
    state, history = run_steps(step_fn(TINY, BF16_OPTIONS), init_state(params["tied"], OPT), [TRAIN] * 3)
    assert all(math.isfinite(h["loss"]) and h["skipped"] == 0 for h in history)
    np.testing.assert_allclose(history[0]["loss"], overfit_run[1][0]["loss"], rtol=RTOL_BF16)
    assert history[2]["loss"] < history[0]["loss"]
    for leaf in jax.tree.leaves(state.params) + [m for tree in child.adam_moments(state.opt_state)
                                                 for m in jax.tree.leaves(tree)]:
        assert leaf.dtype == jnp.float32
    # The updates (lr 2e-3 at step 1, parameters ~4e-2) are kept at f32 precision, not rounded to bf16 (a random f32
    # number is bf16-representable with probability 2^-16).
    q_proj = np.asarray(state.params["layers"]["q_proj"])
    assert not np.array_equal(q_proj, params["tied"]["layers"]["q_proj"])
    bf16_representable = q_proj == q_proj.astype(jnp.bfloat16).astype(np.float32)
    assert bf16_representable.mean() < 0.01


def test_non_finite_batch_is_skipped_bit_for_bit(params):
    """A batch whose loss is NaN: one loss weight is NaN (a corrupt batch, e.g. a 0/0 in a data pipeline's per-token
    weights). The update is skipped, the schedule does not advance, and the next batch trains exactly as if the bad
    one never came."""
    step = step_fn()
    bad = dict(TRAIN, loss_mask=TRAIN["loss_mask"].copy())
    bad["loss_mask"][3, 5] = np.nan
    state, history = run_steps(step, init_state(params["tied"], OPT), [TRAIN, TRAIN])
    before = host(state)
    state, metrics = step(state, {}, bad)
    metrics = metrics_to_host(metrics)
    assert metrics["skipped"] == 1 and not math.isfinite(metrics["loss"])
    assert int(state.step) == 3 and int(state.skipped) == 1
    assert_trees_equal(host(state.params), before.params)
    assert_trees_equal(host(state.opt_state), before.opt_state)
    assert not np.array_equal(np.asarray(state.rng), before.rng)
    np.testing.assert_allclose(metrics["lr"], expected_lr(2), rtol=1e-6)

    state, after = run_steps(step, state, [TRAIN])
    assert after[0]["skipped"] == 0 and math.isfinite(after[0]["loss"]) and int(state.skipped) == 1
    assert after[0]["lr"] == metrics["lr"]  # the schedule did not advance on the skipped step
    reference, ref_history = run_steps(step, init_state(params["tied"], OPT), [TRAIN] * 3)
    assert after[0]["loss"] == ref_history[2]["loss"]
    assert_trees_equal(host(state.params), host(reference.params))
    assert_trees_equal(host(state.opt_state), host(reference.opt_state))


def test_inf_in_a_frozen_embedding_row_skips_only_the_batches_that_use_it(params):
    """A frozen base (f32 here) whose embedding row for one rare token is inf, say a row that overflowed when the
    checkpoint was converted to a narrower dtype: batches without that token train, a batch with it is skipped and
    leaves the state as it was, and training goes on."""
    trained, frozen = split_frozen(params["untied"])
    frozen = {"embed": np.asarray(frozen["embed"]).copy()}
    frozen["embed"][0] = np.inf
    step = step_fn(TINY_UNTIED)
    bad = dict(TRAIN, tokens=TRAIN["tokens"].copy())
    bad["tokens"][2, 7] = 0
    state, history = run_steps(step, init_state(trained, OPT), [TRAIN], frozen)
    assert history[0]["skipped"] == 0 and math.isfinite(history[0]["loss"])
    before = host(state)
    state, history = run_steps(step, state, [bad], frozen)
    assert history[0]["skipped"] == 1 and int(state.skipped) == 1 and int(state.step) == 2
    assert_trees_equal(host(state.params), before.params)
    assert_trees_equal(host(state.opt_state), before.opt_state)
    state, history = run_steps(step, state, [TRAIN], frozen)
    assert history[0]["skipped"] == 0 and math.isfinite(history[0]["loss"]) and history[0]["lr"] > 0
    assert max_abs_diff(state.params, before.params) > 1e-4  # trained again


def test_decay_mask_decays_matrices_not_norms(params):
    mask = decay_mask(params["untied"])
    assert mask == {
        "embed": True, "lm_head": True, "final_norm": False,
        "layers": {"attn_norm": False, "mlp_norm": False, "q_proj": True, "k_proj": True, "v_proj": True,
                   "o_proj": True, "gate_proj": True, "up_proj": True, "down_proj": True},
    }


def test_zero_gradient_steps_shrink_matrices_and_leave_norms(params):
    """With every loss weight 0 the gradient is exactly 0, so AdamW's update is the weight decay alone:
    p <- p * (1 - lr_t * weight_decay) for matrices, nothing for norms. lr_t follows the schedule (0 at step 0)."""
    no_loss = dict(TRAIN, loss_mask=np.zeros_like(TRAIN["loss_mask"]))
    step = step_fn()
    state = init_state(params["tied"], OPT)
    for t in range(4):
        before = host(state.params)
        state, metrics = step(state, {}, no_loss)
        metrics = metrics_to_host(metrics)
        assert metrics["grad_norm"] == 0 and metrics["loss"] == 0 and metrics["skipped"] == 0
        after = host(state.params)
        for key in ("attn_norm", "mlp_norm"):
            np.testing.assert_array_equal(after["layers"][key], before["layers"][key])
        np.testing.assert_array_equal(after["final_norm"], before["final_norm"])
        factor = 1 - expected_lr(t) * OPTIMIZER.weight_decay
        for got, want in ((after["embed"], before["embed"]), (after["layers"]["q_proj"], before["layers"]["q_proj"]),
                          (after["layers"]["down_proj"], before["layers"]["down_proj"])):
            if t == 0:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want * factor, rtol=1e-6, atol=0)
                assert np.abs(got).sum() < np.abs(want).sum()


def test_assemble_params_and_a_frozen_part(params):
    trained, frozen = split_frozen(params["untied"])
    assembled = assemble_params(trained, frozen)
    assert set(assembled) == set(params["untied"]) and assembled["embed"] is frozen["embed"]
    frozen_before = host(frozen)
    state, history = run_steps(step_fn(TINY_UNTIED), init_state(trained, OPT), [TRAIN] * 3, frozen)
    assert set(state.params) == {"layers", "final_norm", "lm_head"}
    for moments in child.adam_moments(state.opt_state):
        assert set(moments) == set(state.params)
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(host(state.params))[0],
                                jax.tree.leaves(trained)):
        assert not np.array_equal(new, old), f"trained leaf {path} did not change"
    assert_trees_equal(host(frozen), frozen_before)
    assert history[-1]["loss"] < history[0]["loss"]


# ==== 3. sharding (8-device child) ====================================================================================

LOGICAL_TO_MESH = {"vocab": "tensor", "embed": "fsdp", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


def expected_shard_shapes(mesh_shape: dict) -> dict[str, list[int]]:
    """What each device should hold: an axis named embed splits over fsdp; vocab, heads and mlp over tensor."""
    specs = jax.tree_util.tree_flatten_with_path(llama_specs(TINY), is_leaf=is_spec)[0]
    return {"/".join(str(k.key) for k in path): [dim // mesh_shape[LOGICAL_TO_MESH[axis]] if axis in LOGICAL_TO_MESH
                                                 else dim for dim, axis in zip(spec.shape, spec.axes)]
            for path, spec in specs}


def test_child_sees_eight_devices(sharded_result):
    assert sharded_result["device_count"] == 8
    assert set(sharded_result["meshes"]) == set(child.MESHES)


@pytest.mark.parametrize("mesh", child.MESHES)
def test_sharded_training_matches_one_device(sharded_result, ragged_run, mesh, background):
    result = sharded_result["meshes"][mesh]
    base_state, base_history = ragged_run
    np.testing.assert_allclose(result["losses"], [h["loss"] for h in base_history], rtol=RTOL_REFERENCE)
    np.testing.assert_allclose(result["grad_norms"], [h["grad_norm"] for h in base_history], rtol=RTOL_GRAD_NORM)
    with np.load(background["work"] / "sharded" / f"params_{mesh}.npz") as saved:
        sharded_params = child.unflatten(dict(saved))
    assert jax.tree.structure(sharded_params) == jax.tree.structure(base_state.params)
    assert max_abs_diff(sharded_params, base_state.params) < ATOL_PARAMS


@pytest.mark.parametrize("mesh", child.MESHES)
def test_parameters_and_moments_are_really_sharded(sharded_result, mesh):
    result = sharded_result["meshes"][mesh]
    expected = expected_shard_shapes(result["mesh_shape"])
    assert result["param_shard_shapes"] == expected
    assert len(result["moment_shard_shapes"]) == 2  # mu and nu
    assert all(moments == expected for moments in result["moment_shard_shapes"])
    assert result["moments_like_params"] and result["state_has_requested_shardings"]
    rows = 8 // (result["mesh_shape"]["data"] * result["mesh_shape"]["fsdp"])
    assert result["batch_shard_shape"] == [rows, 16]
    # Spot checks, spelled out.
    if mesh == "fsdp8":
        assert expected["embed"] == [256, 8] and result["param_specs"]["embed"] == [None, "fsdp"]
    if mesh == "fsdp4_tensor2":
        assert expected["layers/q_proj"] == [2, 16, 2, 16] and expected["layers/k_proj"] == [2, 16, 1, 16]
    if mesh == "data8":  # replicas: every device holds everything
        assert result["param_shard_shapes"]["embed"] == [256, 64]
        assert result["param_shard_shapes"]["layers/q_proj"] == [2, 64, 4, 16]


def test_checkpoint_restores_onto_other_shardings(sharded_result):
    restores = sharded_result["restores"]
    for target in ("data4_tensor2", "single_device"):
        entry = restores[target]
        assert entry["is_train_state"] and entry["bitwise_equal"] and entry["has_requested_shardings"], target
        assert entry["data_state"] == {"position": child.SHARDED_STEPS}
    assert restores["data4_tensor2"]["embed_shard_shape"] == [128, 64]  # vocab over tensor=2
    assert restores["single_device"]["embed_shard_shape"] == [256, 64]
    # Resuming on data=4 x tensor=2 continues the fsdp=8 run.
    np.testing.assert_allclose(restores["data4_tensor2"]["next_loss"], sharded_result["fsdp8_next_loss"],
                               rtol=RTOL_REFERENCE)


def test_sharding_errors_are_one_line_config_errors(sharded_result):
    errors = sharded_result["errors"]
    for name in ("heads_do_not_divide", "kv_heads_do_not_divide", "model_does_not_divide", "batch_does_not_divide",
                 "accum_batch_does_not_divide", "fill_does_not_divide"):
        assert errors[name]["type"] == "ConfigError", errors[name]
        assert "\n" not in errors[name]["message"]
    messages = {name: error.get("message", "") for name, error in errors.items()}
    assert "'q_heads' of size 4" in messages["heads_do_not_divide"] and "3" in messages["heads_do_not_divide"]
    assert "'kv_heads' of size 2" in messages["kv_heads_do_not_divide"] and "4" in messages["kv_heads_do_not_divide"]
    assert "'tensor'" in messages["model_does_not_divide"]
    assert "12" in messages["batch_does_not_divide"] and "data x fsdp = 8" in messages["batch_does_not_divide"]
    assert "accum_steps 8" in messages["accum_batch_does_not_divide"]
    assert "8" in messages["fill_does_not_divide"] and "device" in messages["fill_does_not_divide"]
    assert errors["fill_ok"]["type"] is None and "'data': 4" in errors["fill_ok"]["value"]


# ==== 4. errors =======================================================================================================

@pytest.mark.parametrize("axes, expected", [
    (dict(data=2), "make the product equal the device count"),
    (dict(data=-1, fsdp=-1), "only one mesh axis may be -1"),
    (dict(data=1.5), "must be a positive integer"),
    (dict(fsdp="2"), "must be a positive integer"),
    (dict(tensor=True), "must be a positive integer"),
    (dict(data=0), "must be a positive integer"),
    (dict(data=-2), "must be a positive integer"),
])
def test_make_mesh_rejects_bad_axes(axes, expected):
    with pytest.raises(ConfigError) as excinfo:
        make_mesh(**axes, devices=jax.devices()[:1])
    assert expected in one_line(excinfo)


def test_check_batch_divides_on_one_device():
    mesh = make_mesh(devices=jax.devices()[:1])
    check_batch_divides(8, mesh, accum_steps=4)
    with pytest.raises(ConfigError) as excinfo:
        check_batch_divides(6, mesh, accum_steps=4)
    assert "make batch_size a multiple of accum_steps * data * fsdp" in one_line(excinfo)


@pytest.mark.parametrize("changes", [
    dict(compute_dtype="float16"), dict(remat="everything"), dict(loss_chunk=0), dict(loss_chunk=2.5),
    dict(accum_steps=0), dict(accum_steps=True), dict(accum_steps="2"), dict(z_loss_weight=-1e-4),
])
def test_step_options_reject_bad_values(changes):
    with pytest.raises(ConfigError) as excinfo:
        StepOptions(**changes)
    assert next(iter(changes)) in one_line(excinfo)


@pytest.mark.parametrize("changes", [
    dict(decay="exponential"), dict(learning_rate=0.0), dict(learning_rate=-1e-3), dict(learning_rate=float("nan")),
    dict(warmup_steps=-1), dict(min_lr_ratio=1.5), dict(min_lr_ratio=-0.1), dict(weight_decay=-0.1),
    dict(max_grad_norm=0.0),
])
def test_optimizer_config_rejects_bad_values(changes):
    with pytest.raises(ConfigError) as excinfo:
        OptimizerConfig(**changes)
    assert f"optimizer.{next(iter(changes))}" in one_line(excinfo)


# NaN weight decay, say, would pass the NaN guard (it checks the loss and the gradient norm, not the update) and turn
# the first update into NaN parameters: such values are refused up front.
@pytest.mark.parametrize("make", [
    lambda: StepOptions(z_loss_weight=float("nan")), lambda: StepOptions(z_loss_weight=float("inf")),
    lambda: OptimizerConfig(weight_decay=float("nan")), lambda: OptimizerConfig(weight_decay=float("inf")),
    lambda: OptimizerConfig(learning_rate=float("inf")), lambda: OptimizerConfig(b1=1.0),
    lambda: OptimizerConfig(b2=1.5), lambda: OptimizerConfig(eps=-1e-8), lambda: OptimizerConfig(warmup_steps=2.5),
], ids=["z_loss_nan", "z_loss_inf", "weight_decay_nan", "weight_decay_inf", "lr_inf", "b1_1", "b2_1.5",
        "eps_negative", "warmup_2.5"])
def test_non_finite_or_out_of_range_hyperparameters_are_rejected(make):
    with pytest.raises(ConfigError) as error:
        make()
    assert len(str(error.value).splitlines()) == 1


def test_split_microbatches(params):
    split = split_microbatches(RAGGED, 4)
    assert split["tokens"].shape == (4, 2, 16)
    np.testing.assert_array_equal(split["tokens"].reshape(8, 16), RAGGED["tokens"])
    with pytest.raises(ConfigError) as excinfo:
        split_microbatches(RAGGED, 3)
    assert "accum_steps=3" in one_line(excinfo)
    # The step refuses it too, when it is traced (before anything is compiled).
    step = make_train_step(TINY, OPT, SCHEDULE, dataclasses.replace(STEP_OPTIONS, accum_steps=3))
    state = jax.eval_shape(lambda: init_state(params["tied"], OPT))
    with pytest.raises(ConfigError):
        jax.eval_shape(step, state, {}, RAGGED)


# ==== 5. checkpoints ==================================================================================================

DATA_STATE = {"epoch": 1, "position": 17, "seed": 1234, "files": ["a.jsonl", "b.jsonl"],
              "pending": {"key": 3, "offset": 5}, "fraction": 0.25}


@pytest.fixture(scope="module")
def trained_state(params) -> TrainState:
    """A state two steps in (Adam moments, counters and the key all non-trivial)."""
    return run_steps(step_fn(), init_state(params["tied"], OPT), [TRAIN, TRAIN])[0]


def test_checkpoint_round_trip_is_bitwise(trained_state, tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(2, trained_state, DATA_STATE)
    checkpointer.wait()
    assert checkpointer.latest_step() == 2
    restored, data_state = checkpointer.restore(abstract_like(trained_state))
    checkpointer.close()
    assert isinstance(restored, TrainState)
    assert_trees_equal(restored, trained_state)
    assert int(restored.step) == 2 and data_state == DATA_STATE


def test_checkpoint_keeps_the_last_n(trained_state, tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    for step in range(1, 5):
        checkpointer.save(step, trained_state, {"position": step})
    checkpointer.wait()
    assert checkpointer.all_steps() == [3, 4] and checkpointer.latest_step() == 4
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "4"]
    reopened = Checkpointer(tmp_path / "ckpt", keep=2)
    assert reopened.restore(abstract_like(trained_state), step=3)[1] == {"position": 3}
    reopened.close()


def test_restore_with_a_mismatched_state_is_a_checkpoint_error(params, trained_state, sharded_result, tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(2, trained_state, DATA_STATE)
    checkpointer.wait()
    untied = init_state(params["untied"], OPT)  # an extra lm_head: another tree
    with pytest.raises(CheckpointError) as excinfo:
        checkpointer.restore(abstract_like(untied))
    assert "does not match this run's model and optimizer" in one_line(excinfo)
    checkpointer.close()
    # The same tree with one array of another shape (restored in the child process, see there).
    wider = sharded_result["restores"]["wider_embed"]
    assert wider["type"] == "CheckpointError" and "\n" not in wider["message"], wider
    assert "does not match this run's model and optimizer" in wider["message"]


def test_restore_from_an_empty_directory_is_a_checkpoint_error(trained_state, tmp_path):
    checkpointer = Checkpointer(tmp_path / "nothing")
    assert checkpointer.latest_step() is None and checkpointer.all_steps() == []
    with pytest.raises(CheckpointError) as excinfo:
        checkpointer.restore(abstract_like(trained_state))
    assert "no complete checkpoint" in one_line(excinfo)
    checkpointer.close()


def test_a_save_killed_part_way_leaves_the_previous_checkpoint_usable(interrupted_save):
    proc, work = interrupted_save
    assert proc.wait() == -9, f"the child was not SIGKILLed:\n{proc.log_tail()}"
    marker = json.loads((work / "kill_marker.json").read_text())
    assert marker["step2_started_before_kill"], "orbax never began writing step 2 before the kill"
    directory = work / "ckpt"
    checkpointer = Checkpointer(directory)
    latest = checkpointer.latest_step()
    if marker["step2_complete_before_kill"]:  # the write beat the kill: acceptable, but then it must be whole
        assert latest == 2
        restored, data_state = checkpointer.restore(abstract_like(child.big_state()))
        assert_trees_equal(restored, child.big_state())
    else:
        # The kill landed mid-save: step 2 exists only as orbax's temporary directory, which is ignored.
        assert latest == 1 and checkpointer.all_steps() == [1]
        assert any(p.name.startswith("2.") for p in directory.iterdir()), sorted(os.listdir(directory))
    restored, data_state = checkpointer.restore(abstract_like(child.small_state()), step=1)
    assert_trees_equal(restored, child.small_state())
    assert data_state == {"position": 1}
    # The resumed run can save the next step (over the leftovers of the killed save, if any).
    checkpointer.save(latest + 1, child.small_state(), {"position": latest + 1})
    checkpointer.wait()
    assert checkpointer.latest_step() == latest + 1
    assert checkpointer.restore(abstract_like(child.small_state()))[1] == {"position": latest + 1}
    checkpointer.close()


def test_causal_only_attention_equals_the_segment_mask_on_unpacked_rows():
    """packed=False drops the segment mask: for one document per row, padded at the end, the trained tokens never see
    padding either way (it comes after them), so the loss sums agree within f32 rounding (1e-5)."""
    from smoljax import config as smoljax_config
    from smoljax.training.loss import lm_loss_sums

    config = smoljax_config.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    params = init_params(llama_specs(config), jax.random.PRNGKey(5))
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 256, (3, 17)).astype(np.int32)
    real = np.arange(16)[None, :] < np.array([[16], [9], [4]])
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": real.astype(np.float32),
             "segment_ids": real.astype(np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (3, 1))}
    masked = lm_loss_sums(params, batch, config, attn_impl="xla")
    causal = lm_loss_sums(params, batch, config, attn_impl="xla", segment_mask=False)
    np.testing.assert_allclose(np.asarray(causal), np.asarray(masked), rtol=1e-5)
