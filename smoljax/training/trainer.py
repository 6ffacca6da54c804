"""The recipe runner behind `smoljax train` and `train/finetune.py`: model, mesh, data, state, loop, checkpoints.

A run directory holds recipe.yaml (the resolved recipe), metrics.jsonl, checkpoints/<step>/ and, after
`smoljax export`, an HF model directory (and a PEFT adapter for LoRA runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from smoljax.config import LlamaConfig, VLMConfig
from smoljax.errors import ConfigError
from smoljax.training.recipe import Recipe, load_recipe

RECIPE_FILE = "recipe.yaml"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Model:
    """A model ready to train: its config, full parameters (host or sharded), tokenizer and processor (SmolVLM2)."""

    config: LlamaConfig | VLMConfig
    params: dict
    tokenizer: Any
    processor: Any = None


@dataclasses.dataclass
class Setup:
    """Everything a run needs besides the data: the mesh, the split into trained and frozen parameters, the step."""

    recipe: Recipe
    model: Model
    mesh: jax.sharding.Mesh
    trained_specs: Any
    frozen: dict
    lora: Any
    optimizer: Any
    schedule: Any
    options: Any
    state: Any
    state_shardings: Any


# ---- building the pieces --------------------------------------------------------------------------------------------


DEFAULT_SOURCE = "default"  # SmolLM2-135M-Instruct from the HF cache, the hub or the bundled GGUF (as `smoljax.load()`)


def resolve_source(source: str) -> Path:
    from smoljax.checkpoints.hub import find_default_model, resolve_model_path

    return find_default_model() if source == DEFAULT_SOURCE else resolve_model_path(source)


def load_tokenizer(source: str):
    """The tokenizer of a model directory, hub id or .gguf file (without loading the weights)."""
    from smoljax.tokenizer import Tokenizer

    path = resolve_source(source)
    ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs and not (path.is_dir() and (path / "tokenizer.json").exists()):
        from smoljax.checkpoints.gguf import read_gguf_metadata
        return Tokenizer.from_gguf_metadata(read_gguf_metadata(ggufs[0]))
    return Tokenizer.from_dir(path)


def build_model(recipe: Recipe, mesh: jax.sharding.Mesh) -> Model:
    """Pretrained weights from `model.source`, or a preset initialised from `seed`, sharded over `mesh`."""
    from smoljax.config import preset
    from smoljax.params import init_params, model_specs
    from smoljax.sharding import param_shardings

    section = recipe.model
    if section.source is not None:
        import smoljax

        loaded = smoljax.load(resolve_source(section.source), dtype="float32")
        config, tokenizer = loaded.config, loaded.tokenizer
        if section.tokenizer is not None:
            tokenizer = load_tokenizer(section.tokenizer)
        if tokenizer is None:
            raise ConfigError(f"{section.source} has no tokenizer files; set model.tokenizer to a model that has")
        processor = loaded.processor if isinstance(config, VLMConfig) else None
        params = jax.device_put(loaded.params, param_shardings(model_specs(config), mesh))
        return Model(config, params, tokenizer, processor)
    config = preset(section.preset)
    if section.overrides:
        if isinstance(config, VLMConfig):
            raise ConfigError("model.overrides applies to SmolLM2 presets only")
        try:
            config = config.replace(**section.overrides)
        except TypeError as error:
            raise ConfigError(f"model.overrides: {error}") from None
    tokenizer = load_tokenizer(section.tokenizer)
    specs = model_specs(config)
    init = jax.jit(lambda key: init_params(specs, key), out_shardings=param_shardings(specs, mesh))
    return Model(config, init(jax.random.PRNGKey(recipe.seed)), tokenizer)


def _check_vocab(model: Model) -> None:
    text = model.config.text if isinstance(model.config, VLMConfig) else model.config
    if model.tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(f"the tokenizer has {model.tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{text.vocab_size}; use the model's own tokenizer or a preset with a larger vocab_size")


def split_trained(model: Model, recipe: Recipe) -> tuple[dict, Any, dict, Any]:
    """(trained params, their specs, frozen params, LoraConfig or None) for the recipe's lora / freeze choices."""
    from smoljax.params import init_params, model_specs

    specs = model_specs(model.config)
    unknown = [name for name in recipe.freeze if name not in model.params]
    if unknown:
        raise ConfigError(f"freeze names {unknown[0]!r}, which this model does not have; "
                          f"its parts are {sorted(model.params)}")
    if recipe.lora is not None:
        from smoljax.training.lora import lora_specs

        lora = recipe.lora
        text_config = model.config.text if isinstance(model.config, VLMConfig) else model.config
        adapter_specs = lora_specs(text_config, lora)
        adapters = init_params(adapter_specs, jax.random.PRNGKey(recipe.seed + 1))
        return {"lora": adapters}, {"lora": adapter_specs}, model.params, lora
    trained = {name: value for name, value in model.params.items() if name not in recipe.freeze}
    frozen = {name: value for name, value in model.params.items() if name in recipe.freeze}
    if not trained:
        raise ConfigError("freeze lists every part of the model: nothing would be trained")
    return trained, {name: specs[name] for name in trained}, frozen, None


def prepare(recipe: Recipe) -> Setup:
    """Checks the recipe's values, then builds the mesh, the model, the optimizer and a fresh sharded state."""
    from smoljax.params import cast_params
    from smoljax.sharding import check_batch_divides, make_mesh
    from smoljax.training.data import validate_data_config
    from smoljax.training.optimizer import lr_schedule, make_optimizer
    from smoljax.training.step import COMPUTE_DTYPES, StepOptions, init_state, state_shardings

    # Cheap checks first: a bad value stops the run before any weights are read.
    options = StepOptions(**dataclasses.asdict(recipe.train))
    validate_data_config(data_config(recipe))
    mesh = make_mesh(recipe.mesh.data, recipe.mesh.fsdp, recipe.mesh.tensor)
    check_batch_divides(recipe.data.batch_size, mesh, options.accum_steps)

    model = build_model(recipe, mesh)
    _check_vocab(model)
    # Unpacked rows (one example each, padding at the end; SmolVLM2 rows always) need only causal attention.
    packed = recipe.data.pack and not isinstance(model.config, VLMConfig)
    options = dataclasses.replace(options, packed=packed)
    trained, trained_specs, frozen, lora = split_trained(model, recipe)
    # Frozen weights are only read: keep them in the compute dtype (half the memory of f32 under bf16).
    frozen = cast_params(frozen, COMPUTE_DTYPES[options.compute_dtype])
    optimizer = make_optimizer(recipe.optimizer, recipe.steps)
    schedule = lr_schedule(recipe.optimizer, recipe.steps)
    state = init_state(trained, optimizer, recipe.seed)
    shardings = state_shardings(state, trained_specs, optimizer, mesh)
    state = jax.device_put(state, shardings)
    return Setup(recipe, model, mesh, trained_specs, frozen, lora, optimizer, schedule, options, state, shardings)


def data_config(recipe: Recipe):
    from smoljax.training.data import DataConfig

    section = recipe.data
    return DataConfig(source=section.source, seq_len=section.seq_len, batch_size=section.batch_size,
                      format=section.format, text_key=section.text_key, messages_key=section.messages_key,
                      pack=section.pack, assistant_only_loss=section.assistant_only_loss, seed=recipe.seed,
                      shuffle=section.shuffle)


def make_batches(setup: Setup):
    """The run's batch iterator: packed text/chat for SmolLM2, image+text chat for SmolVLM2."""
    from smoljax.training.data import TrainBatches, load_records

    recipe = setup.recipe
    records = load_records(recipe.data.source)
    if isinstance(setup.model.config, VLMConfig):
        from smoljax.training.vlm_data import VLMBatches

        return VLMBatches(records, setup.model.processor, setup.model.config, data_config(recipe),
                          max_tiles=recipe.data.max_tiles, accum_steps=setup.options.accum_steps)
    return TrainBatches(records, setup.model.tokenizer, data_config(recipe))


def to_global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host arrays of the whole global batch -> arrays sharded over data x fsdp. Every process builds the same global
    batch (the pipeline is deterministic) and contributes the rows its devices hold."""
    from smoljax.sharding import batch_sharding

    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    index, count = jax.process_index(), jax.process_count()

    def local_rows(array):
        rows = array.shape[0] // count
        return array[index * rows:(index + 1) * rows]
    return {key: jax.make_array_from_process_local_data(sharding, local_rows(value), value.shape)
            for key, value in batch.items()}


# ---- the run ----------------------------------------------------------------------------------------------------------


def initialize_distributed() -> None:
    """Joins a multi-host job when the environment describes one; a single process does nothing.

    `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) names the coordinator explicitly;
    otherwise JAX's own cluster detection covers SLURM (`SLURM_NTASKS` > 1), Open MPI and Cloud TPU pods.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        try:
            jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                       num_processes=int(env["JAX_NUM_PROCESSES"]),
                                       process_id=int(env["JAX_PROCESS_ID"]))
        except (KeyError, ValueError):
            raise ConfigError("JAX_COORDINATOR_ADDRESS needs JAX_NUM_PROCESSES and JAX_PROCESS_ID (integers) on "
                              "every host") from None
        return
    several_tasks = int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if several_tasks or tpu_pod:
        jax.distributed.initialize()


def train(recipe: Recipe, *, resume: bool = False, stream=sys.stderr) -> dict[str, Any]:
    """Runs a recipe to `recipe.steps`; with `resume`, continues from the newest checkpoint in `out_dir`.
    Returns the last logged metrics."""
    from smoljax.training.checkpoint import Checkpointer, abstract_like
    from smoljax.training.metrics import MetricsLogger, Throughput, decoder_flops_per_token, device_peak_flops
    from smoljax.training.step import make_train_step, metrics_to_host

    initialize_distributed()
    out_dir = Path(recipe.out_dir)
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    if not resume and checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        raise ConfigError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, or set a new "
                          "out_dir")
    if resume and not (out_dir / RECIPE_FILE).is_file():
        raise ConfigError(f"nothing to resume in {out_dir}: it has no {RECIPE_FILE}; run without --resume")
    setup = prepare(recipe)
    batches = make_batches(setup)
    checkpointer = Checkpointer(checkpoint_dir, keep=recipe.checkpoint.keep, async_save=recipe.checkpoint.async_save)
    state, start = setup.state, 0
    if resume:
        state, data_state = checkpointer.restore(abstract_like(setup.state, setup.state_shardings))
        batches.restore(data_state)
        start = int(state.step)
    _write_recipe(recipe, out_dir)
    if jax.process_index() == 0:
        _truncate_metrics(out_dir / "metrics.jsonl", start)

    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(make_train_step(setup.model.config, setup.optimizer, setup.schedule, setup.options,
                                      setup.lora),
                      donate_argnums=0, out_shardings=(setup.state_shardings, replicated))
    is_main = jax.process_index() == 0
    logger = MetricsLogger(out_dir if is_main else None, recipe.steps, start_step=start,
                           tensorboard=recipe.log.tensorboard and is_main, progress=recipe.log.progress and is_main,
                           stream=stream)
    throughput = Throughput(decoder_flops_per_token(setup.model.config, recipe.data.seq_len),
                            device_peak_flops(), jax.device_count())
    last: dict[str, Any] = {}
    try:
        for step in range(start, recipe.steps):
            batch = next(batches)
            state, metrics = step_fn(state, setup.frozen, to_global_batch(batch, setup.mesh))
            throughput.add(int(np.count_nonzero(batch["segment_ids"])))
            done = step + 1
            if done % recipe.log.every == 0 or done == recipe.steps:
                last = {**metrics_to_host(metrics), **throughput.rates()}
                logger.log(done, last)
            if done % recipe.checkpoint.every == 0 or done == recipe.steps:
                checkpointer.save(done, state, batches.state())
            if recipe.sample.every and done % recipe.sample.every == 0:
                logger.write_text(done, "sample", sample_text(setup, state.params))
            logger.advance()
    finally:
        checkpointer.close()
        logger.close()
    return last


def _write_recipe(recipe: Recipe, out_dir: Path) -> None:
    if jax.process_index() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    temp = out_dir / (RECIPE_FILE + ".tmp")
    temp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    temp.replace(out_dir / RECIPE_FILE)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops records after `last_step`: steps redone after a resume are logged once, by the run that kept them."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def sample_text(setup: Setup, trained: Any) -> str:
    """Greedy continuation of the recipe's sample prompt by the current weights (gathered to one device)."""
    from smoljax.generation import generate
    from smoljax.training.step import assemble_params

    recipe, model = setup.recipe, setup.model
    params = jax.device_get(assemble_params(trained, setup.frozen, setup.lora))
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    tokenizer = model.tokenizer
    if recipe.sample.chat and tokenizer.chat_template is not None:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": recipe.sample.prompt}], tokenize=True)
    else:
        prompt = tokenizer.encode(recipe.sample.prompt, add_special_tokens=True)
    result = generate(params, model.config, [prompt], max_new_tokens=recipe.sample.max_new_tokens)
    return tokenizer.decode(result.tokens[0], skip_special_tokens=True)


# ---- export -----------------------------------------------------------------------------------------------------------


def restore_trained(run_dir: str | Path, step: int | None = None) -> tuple[Setup, Any]:
    """The run's setup (without data) and its trained parameters at `step` (default: the newest checkpoint)."""
    from smoljax.training.checkpoint import Checkpointer, abstract_like

    run_dir = Path(run_dir)
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise ConfigError(f"{run_dir} is not a training run directory: it has no {RECIPE_FILE}")
    recipe = load_recipe(recipe_path)
    setup = prepare(recipe)
    checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR, keep=recipe.checkpoint.keep, async_save=False)
    try:
        state, _ = checkpointer.restore(abstract_like(setup.state, setup.state_shardings), step)
    finally:
        checkpointer.close()
    return setup, state.params


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, *, step: int | None = None,
               dtype: str | None = None) -> Path:
    """Writes the run's newest (or `step`'s) weights as an HF model directory (LoRA merged in); a LoRA run also
    gets its adapters in PEFT format under `<out_dir>/adapter`. Returns the directory written."""
    from smoljax.checkpoints.loader import save_pretrained
    from smoljax.training.step import assemble_params

    run_dir = Path(run_dir)
    setup, trained = restore_trained(run_dir, step)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    model = setup.model
    # The frozen part from the model as loaded (f32), not the compute-dtype copy the steps read.
    frozen = {name: model.params[name] for name in setup.frozen}
    params = jax.device_get(assemble_params(trained, frozen, setup.lora))
    save_pretrained(out_dir, model.config, jax.tree.map(np.asarray, params), model.tokenizer,
                    processor=model.processor, dtype=dtype)
    if setup.lora is not None:
        from smoljax.training.lora import save_peft_adapter

        text_config = model.config.text if isinstance(model.config, VLMConfig) else model.config
        save_peft_adapter(out_dir / "adapter", jax.device_get(trained["lora"]), setup.lora, text_config,
                          base_model=setup.recipe.model.source)
    return out_dir
