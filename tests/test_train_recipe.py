"""Recipes end to end: `smoljax train` / `train/finetune.py`, exact resume after SIGKILL, HF and PEFT export, SmolVLM2
fine-tuning with a frozen or trained vision tower, and one-line errors for bad recipes.

Tolerances:
- resume: bitwise. The resumed process compiles the same program for the same shapes on the same CPU, restores the
  exact f32 state and data position, so every later loss must be the identical float;
- export: logits within 1e-4 of smoljax's on the restored weights (tiny f32 models, logits of order 10; only the
  order of reductions differs between XLA and torch, ~1e-6);
- PEFT: the same 1e-4 (the adapters are merged in f32 on both sides).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import smoljax
from smoljax.cli import main as cli_main
from smoljax.config import LlamaConfig, VisionConfig, preset
from smoljax.models import smollm2, smolvlm2
from smoljax.params import init_params, llama_specs, vlm_specs
from smoljax.training.recipe import load_recipe, recipe_from_dict
from smoljax.training.trainer import export_run, restore_trained, train

REPO = Path(__file__).resolve().parents[1]
TINY_SMOKE = REPO / "configs" / "tiny-smoke.yaml"
# Short runs of the tiny-smoke recipe: 64-token rows, a loss line every step, a checkpoint every 4 steps.
FAST = ["steps=12", "data.seq_len=64", "checkpoint.every=4", "log.every=1", "sample.every=0", "log.progress=false",
        "log.tensorboard=false"]


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def _train_command(out_dir: Path, *extra: str) -> list[str]:
    sets = [arg for item in [*FAST, f"out_dir={out_dir}"] for arg in ("--set", item)]
    return [sys.executable, str(REPO / "train" / "finetune.py"), str(TINY_SMOKE), *sets, *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, real_gguf_path) -> Path:
    """tiny-smoke for 12 steps without interruption, through train/finetune.py."""
    out_dir = tmp_path_factory.mktemp("runs") / "reference"
    subprocess.run(_train_command(out_dir), check=True, capture_output=True, timeout=600)
    return out_dir


def test_loss_decreases_on_the_bundled_corpus(reference_run):
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 1.0, losses
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit()) == [8, 12]


def test_sigkill_then_resume_gives_the_same_losses(reference_run, tmp_path):
    out_dir = tmp_path / "killed"
    process = subprocess.Popen(_train_command(out_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and max(_losses(out_dir), default=0) >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_losses(out_dir))
    assert 6 <= killed_at < 12
    subprocess.run(_train_command(out_dir, "--resume"), check=True, capture_output=True, timeout=600)
    assert _losses(out_dir) == _losses(reference_run)  # bitwise: identical floats at every step


def test_export_loads_in_transformers_with_matching_logits(reference_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    exported = export_run(reference_run, tmp_path / "hf")
    setup, trained = restore_trained(reference_run)
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 16)).astype(np.int32)
    ours = np.asarray(smollm2.forward(jax.device_get(trained), tokens, setup.model.config))
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    # The exported directory also loads back in smoljax, bit for bit.
    loaded = smoljax.load(exported)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(jax.device_get(trained))):
        np.testing.assert_array_equal(a, b)


# ---- LoRA through the recipe -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory, real_gguf_path) -> Path:
    """A random tiny SmolLM2-shaped HF model with the real SmolLM2 tokenizer (vocabulary 49152)."""
    from smoljax.checkpoints.gguf import read_gguf_metadata
    from smoljax.tokenizer import Tokenizer

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
    params = init_params(llama_specs(config), jax.random.PRNGKey(3))
    tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(real_gguf_path))
    directory = tmp_path_factory.mktemp("tiny_base")
    smoljax.save_pretrained(directory, config, jax.device_get(params), tokenizer)
    return directory


def test_lora_run_exports_an_adapter_peft_loads(tiny_base_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    recipe = recipe_from_dict({
        "model": {"source": str(tiny_base_dir)}, "out_dir": str(tmp_path / "lora"), "steps": 3,
        "data": {"source": "builtin:pydoc-chat", "seq_len": 64, "batch_size": 2},
        "optimizer": {"learning_rate": 5e-2, "warmup_steps": 0},
        "train": {"compute_dtype": "float32", "remat": "none"},
        "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    })
    train(recipe)
    exported = export_run(recipe.out_dir)
    setup, trained = restore_trained(recipe.out_dir)
    assert set(trained) == {"lora"}
    tokens = np.random.default_rng(1).integers(0, 49152, (2, 12)).astype(np.int32)
    from smoljax.training.step import assemble_params

    base = smoljax.load(tiny_base_dir).params
    ours = np.asarray(smollm2.forward(assemble_params(jax.device_get(trained), base, setup.lora), tokens,
                                      setup.model.config))
    assert np.abs(ours - np.asarray(smollm2.forward(base, tokens, setup.model.config))).max() > 1e-3  # it trained
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf_base, exported / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        for model in (adapted, merged):
            np.testing.assert_allclose(model(torch.from_numpy(tokens).long()).logits.numpy(), ours, atol=1e-4)


# ---- SmolVLM2 --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm_data(tmp_path_factory, real_gguf_path) -> tuple[Path, Path]:
    """(a tiny random SmolVLM2 directory whose processor keeps each image whole, a .jsonl of image chats)."""
    from PIL import Image

    from smoljax.processor import ImageProcessorConfig, VLMProcessor
    from vlm_fixtures import build_smolvlm2_tokenizer_dir, sample_images

    root = tmp_path_factory.mktemp("tiny_vlm")
    config = preset("SmolVLM2-500M-Video-Instruct")
    config = config.replace(
        text=config.text.replace(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=32),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    processor = VLMProcessor.from_dir(build_smolvlm2_tokenizer_dir(root / "tokenizer", real_gguf_path))
    processor = VLMProcessor(processor.tokenizer, ImageProcessorConfig(do_image_splitting=False),
                             processor.image_seq_len)
    params = init_params(vlm_specs(config), jax.random.PRNGKey(0))
    smoljax.save_pretrained(root / "model", config, jax.device_get(params), processor=processor)
    images = sample_images()
    with open(root / "chats.jsonl", "w") as file:
        for name, answer in (("chelsea", "A cat."), ("coffee", "A cup of coffee."), ("rocket", "A rocket.")):
            Image.fromarray(images[name]).save(root / f"{name}.png")
            file.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": answer}], "images": [f"{name}.png"]}) + "\n")
    return root / "model", root / "chats.jsonl"


def test_vlm_batches_train_the_answers_only(tiny_vlm_data):
    from smoljax.training.data import DataConfig, load_records
    from smoljax.training.vlm_data import VLMBatches

    model_dir, chats = tiny_vlm_data
    loaded = smoljax.load(model_dir)
    data = DataConfig(source=str(chats), seq_len=128, batch_size=2, shuffle=False)
    batches = VLMBatches(load_records(str(chats)), loaded.processor, loaded.config, data, max_tiles=2)
    batch = next(batches)
    tokenizer = loaded.tokenizer
    trained = [tokenizer.decode(batch["targets"][row][batch["loss_mask"][row] > 0]) for row in range(2)]
    assert trained == [" A cat.<end_of_utterance>", " A cup of coffee.<end_of_utterance>"]
    image_tokens = (batch["tokens"] == loaded.config.image_token_id).sum()
    assert image_tokens == 2 * loaded.config.image_seq_len  # one tile per image, 64 features each
    assert batch["pixel_values"].shape == (2, 3, 512, 512) and batch["pixel_mask"].all()
    # Resuming from the saved position gives the next batch exactly.
    state = json.loads(json.dumps(batches.state()))
    expected = next(batches)
    resumed = VLMBatches(load_records(str(chats)), loaded.processor, loaded.config, data, max_tiles=2, state=state)
    for key, value in next(resumed).items():
        np.testing.assert_array_equal(value, expected[key])


@pytest.mark.parametrize("freeze", [["vision"], []], ids=["vision-frozen", "vision-trained"])
def test_vlm_finetune_with_the_vision_tower_frozen_or_trained(tiny_vlm_data, tmp_path, freeze):
    model_dir, chats = tiny_vlm_data
    recipe = recipe_from_dict({
        "model": {"source": str(model_dir)}, "out_dir": str(tmp_path / "vlm"), "steps": 2, "freeze": freeze,
        "data": {"source": str(chats), "seq_len": 128, "batch_size": 2, "max_tiles": 1},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0},
        "train": {"compute_dtype": "float32", "remat": "none", "accum_steps": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    })
    metrics = train(recipe)
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0
    exported = smoljax.load(export_run(recipe.out_dir)).params
    original = smoljax.load(model_dir).params
    vision_same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported["vision"]),
                                                          jax.tree.leaves(original["vision"])))
    assert vision_same == bool(freeze)
    assert not np.array_equal(exported["text"]["layers"]["q_proj"], original["text"]["layers"]["q_proj"])


# ---- recipes and their errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_reads_and_takes_out_dir_and_steps(path, tmp_path):
    recipe = load_recipe(path, [f"out_dir={tmp_path}", "steps=7"])
    assert recipe.out_dir == str(tmp_path) and recipe.steps == 7
    # The sections build the library's own configs (their checks run too).
    from smoljax.training.step import StepOptions
    from smoljax.training.trainer import data_config
    from smoljax.training.data import validate_data_config
    import dataclasses

    StepOptions(**dataclasses.asdict(recipe.train))
    validate_data_config(data_config(recipe))


def _cli_error(capsys, *args: str) -> str:
    assert cli_main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("smoljax: error: "), err
    return err


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.learning_rat=1e-4"], "unknown key 'optimizer.learning_rat' in the recipe (did you mean 'learning_rate'?)"),
    (["stepz=3"], "unknown key 'stepz'"),
    (["steps=many"], "steps must be an integer, got 'many'"),
    (["data.pack=maybe"], "data.pack must be true/false"),
    (["lora.targets=q_proj"], "lora.targets must be a list"),
    (["lora.targets=[q_proj, qkv]"], "qkv"),
    (["mesh.data=3"], "mesh data=3"),
    (["mesh.fsdp=1", "mesh.tensor=2"], "device"),
    (["train.accum_steps=3"], "accum_steps"),
    (["train.remat=some"], "remat must be one of"),
    (["optimizer.decay=exp"], "optimizer.decay must be one of"),
    (["data.seq_len=0"], "seq_len"),
    (["freeze=[vision]"], "freeze names 'vision'"),
    (["steps"], "--set takes key=value"),
])
def test_bad_recipes_give_one_line(capsys, tmp_path, overrides, message, real_gguf_path):
    sets = [arg for item in [f"out_dir={tmp_path / 'run'}", *overrides] for arg in ("--set", item)]
    assert message in _cli_error(capsys, "train", str(TINY_SMOKE), *sets)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_recipe_file_errors(capsys, tmp_path):
    assert "does not exist" in _cli_error(capsys, "train", str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {source: x\nsteps: [", encoding="utf-8")
    assert "is not valid YAML" in _cli_error(capsys, "train", str(broken))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    assert "must be a YAML mapping" in _cli_error(capsys, "train", str(listed))
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("steps: 3\n", encoding="utf-8")
    assert "missing 'model'" in _cli_error(capsys, "train", str(no_model))
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"model": {"source": "a", "preset": "SmolLM2-135M"}}), encoding="utf-8")
    assert "exactly one of source" in _cli_error(capsys, "train", str(both))


def test_an_existing_run_is_never_overwritten_and_resume_needs_a_run(capsys, reference_run, tmp_path):
    before = _losses(reference_run)
    err = _cli_error(capsys, "train", str(TINY_SMOKE), "--set", f"out_dir={reference_run}")
    assert "already holds checkpoints: pass --resume" in err
    assert _losses(reference_run) == before
    err = _cli_error(capsys, "train", str(TINY_SMOKE), "--set", f"out_dir={tmp_path / 'fresh'}", "--resume")
    assert "nothing to resume" in err
    assert "not a training run directory" in _cli_error(capsys, "export", str(tmp_path))
