"""Saving and loading whole models: `smoljax.save_pretrained` output loads in transformers with the same logits,
transformers' output loads in smoljax, round trips are exact, broken checkpoints give one clear line naming the
tensor or file, and a save that fails part-way leaves the previous checkpoint loadable.

Tolerances (logits of order 1 on the tiny model, up to ~20 on the real one):
- tiny random model, 1e-5 absolute: both sides compute in f32 from identical weights; only the order of the
  reductions differs (torch sdpa vs our einsums), worth ~1e-7 over two layers;
- bf16/f16 storage is compared against smoljax run on the stored-dtype weights cast back to f32, i.e. the very values
  transformers reads, so the same f32 bound applies (the rounding of storage is not part of the comparison);
- real SmolLM2-135M: the weights transformers loads are compared bit for bit; the logits within 3e-4 absolute
  (logits up to ~30). That bound is set by f32 rounding, not by a choice: on this 32-token input transformers' own
  f32 logits are 6.7e-5 from its float64 logits and smoljax's are 1.6e-4 from them (XLA CPU orders the reductions
  differently, and the residual stream reaches |h| ~ 2e4 by layer 20, where one f32 ulp is 2e-3), so the two f32
  results differ by up to ~1.5e-4. A wrongly saved tensor moves logits by far more than 1e-2.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import smoljax
from smoljax.checkpoints import safetensors_io
from smoljax.checkpoints.hf_layout import params_to_hf
from smoljax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from smoljax.config import LlamaConfig
from smoljax.errors import CheckpointError, ConfigError
from smoljax.models import smollm2
from smoljax.params import llama_specs

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32")
TINY_UNTIED = TINY.replace(tie_word_embeddings=False)
CONFIGS = {"tied": TINY, "untied": TINY_UNTIED}
STORAGE = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ATOL_TINY = 1e-5
ATOL_REAL = 3e-4

forward = jax.jit(smollm2.forward, static_argnames=("config", "attn_impl", "remat"))
TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 12)).astype(np.int32)


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random weights (numpy-drawn: fast), with norms away from 1 so a misplaced norm changes the logits."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        if "norm" in spec.axes:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(spec.shape), jnp.float32)
        return jnp.asarray(0.08 * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(draw, llama_specs(config), is_leaf=lambda x: hasattr(x, "axes"))


def through_dtype(params: dict, dtype) -> dict:
    """The weights as stored in `dtype`, back in f32: exactly what a loader reads from that storage."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(dtype).astype(np.float32)), params)


def hf_load(directory: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def our_logits(params, config, tokens=TOKENS) -> np.ndarray:
    return np.asarray(forward(params, jnp.asarray(tokens), config=config))


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "errors must be one line"
    return message


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def tiny_tokenizer():
    """A small word-level tokenizer, enough to exercise tokenizer files in a checkpoint directory."""
    import tokenizers

    from smoljax.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# --- smoljax -> transformers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("tie", CONFIGS)
def test_transformers_loads_our_save_with_the_same_logits(tmp_path, tie, storage):
    config = CONFIGS[tie]
    params = random_params(config)
    smoljax.save_pretrained(tmp_path, config, params, dtype=None if storage == "float32" else storage)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["torch_dtype"] == storage and saved["tie_word_embeddings"] == (tie == "tied")
    stored = read_safetensors(tmp_path)
    assert {array.dtype for array in stored.values()} == {np.dtype(STORAGE[storage])}
    assert ("lm_head.weight" in stored) == (tie == "untied")

    reference = our_logits(through_dtype(params, STORAGE[storage]), config)
    np.testing.assert_allclose(hf_logits(hf_load(tmp_path), TOKENS), reference, atol=ATOL_TINY, rtol=0)
    if storage != "float32":  # storage rounding is real, so the comparison above is not vacuous
        assert np.max(np.abs(reference - our_logits(params, config))) > ATOL_TINY


def test_sharded_save_loads_in_transformers_and_smoljax(tmp_path):
    params = random_params(TINY_UNTIED)
    smoljax.save_pretrained(tmp_path, TINY_UNTIED, params, max_shard_bytes=48 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((tmp_path / shard).is_file() for shard in shards)
    assert not (tmp_path / "model.safetensors").exists()

    np.testing.assert_allclose(hf_logits(hf_load(tmp_path), TOKENS), our_logits(params, TINY_UNTIED),
                               atol=ATOL_TINY, rtol=0)
    loaded = smoljax.load(tmp_path)
    assert loaded.config == TINY_UNTIED
    assert_trees_equal(loaded.params, params)


@pytest.mark.parametrize("tie", CONFIGS)
def test_smoljax_load_gives_back_the_saved_params(tmp_path, tie):
    config = CONFIGS[tie]
    params = random_params(config, seed=3)
    smoljax.save_pretrained(tmp_path / "f32", config, params)
    loaded = smoljax.load(tmp_path / "f32")
    assert loaded.config == config and loaded.tokenizer is None and loaded.source == tmp_path / "f32"
    assert_trees_equal(loaded.params, params)  # bit for bit

    smoljax.save_pretrained(tmp_path / "bf16", config, params, dtype="bfloat16")
    assert_trees_equal(smoljax.load(tmp_path / "bf16").params, through_dtype(params, ml_dtypes.bfloat16))
    as_bf16 = smoljax.load(tmp_path / "bf16", dtype="bfloat16").params
    assert_trees_equal(as_bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


# --- transformers -> smoljax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", CONFIGS)
def test_transformers_save_loads_in_smoljax_with_the_same_logits(tmp_path, tie):
    # rope_theta is not the transformers default (10000), so a loader that misses it gives different logits.
    config = CONFIGS[tie].replace(rope_theta=100000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.1)
    model.save_pretrained(tmp_path)  # safetensors, in transformers' own config.json layout
    assert (tmp_path / "model.safetensors").is_file()

    loaded = smoljax.load(tmp_path)
    assert loaded.config.rope_theta == 100000.0
    assert loaded.config == config.replace(torch_dtype=loaded.config.torch_dtype)
    np.testing.assert_allclose(our_logits(loaded.params, loaded.config), hf_logits(model, TOKENS),
                               atol=ATOL_TINY, rtol=0)


# --- the real model ------------------------------------------------------------------------------------------------


def test_real_model_save_loads_in_transformers(real_model, tmp_path):
    config, params, tokenizer, _ = real_model
    smoljax.save_pretrained(tmp_path, config, params, tokenizer)

    text = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue; "
    tokens = tokenizer.encode(text * 3)[:32]
    assert len(tokens) == 32
    hf_model = hf_load(tmp_path)
    hf_weights = hf_model.state_dict()
    for name, value in params_to_hf(params, config).items():
        np.testing.assert_array_equal(hf_weights[name].numpy(), value, err_msg=name)
    ours = our_logits(params, config, np.asarray([tokens]))
    theirs = hf_logits(hf_model, np.asarray([tokens]))
    np.testing.assert_allclose(theirs, ours, atol=ATOL_REAL, rtol=0)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for sample in (text, "x = [1, 2, 3]  # héllo wörld\n\tdone", "<|im_start|>user\nHi!<|im_end|>\n"):
        assert hf_tokenizer.encode(sample, add_special_tokens=False) == tokenizer.encode(sample)
    assert hf_tokenizer.eos_token == tokenizer.eos_token

    assert LlamaConfig.from_json_file(tmp_path / "config.json") == config.replace(torch_dtype="float32")


# --- broken checkpoints --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    """A freshly saved tiny tied f32 checkpoint to break."""
    directory = tmp_path / "model"
    smoljax.save_pretrained(directory, TINY, random_params(TINY))
    return directory


def rewrite_tensors(directory: Path, change) -> None:
    tensors = read_safetensors(directory)
    change(tensors)
    write_safetensors(directory, tensors)


def test_missing_tensor_is_named(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as excinfo:
        smoljax.load(saved)
    message = one_line(excinfo)
    assert "missing" in message and "model.layers.1.mlp.up_proj.weight" in message and str(saved) in message


def test_unexpected_tensor_is_named(saved):
    rewrite_tensors(saved, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(CheckpointError) as excinfo:
        smoljax.load(saved)
    message = one_line(excinfo)
    assert "unexpected" in message and "model.layers.0.self_attn.q_proj.bias" in message


def test_wrongly_shaped_tensor_is_named(saved):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_tensors(saved, lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
    with pytest.raises(CheckpointError) as excinfo:
        smoljax.load(saved)
    message = one_line(excinfo)
    assert name in message and "(16, 64)" in message and "(32, 64)" in message


def test_untied_config_without_lm_head_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        smoljax.load(saved)


def test_truncated_safetensors_is_named(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        smoljax.load(saved)
    message = one_line(excinfo)
    assert str(weights) in message and "truncated" in message


def test_missing_weights_file_is_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as excinfo:
        smoljax.load(saved)
    message = one_line(excinfo)
    assert str(saved) in message and "model.safetensors" in message


def test_corrupt_config_json_is_named(saved):
    (saved / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    with pytest.raises(ConfigError) as excinfo:
        smoljax.load(saved)
    message = one_line(excinfo)
    assert str(saved / "config.json") in message and "not valid JSON" in message


def test_unknown_model_type_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "gpt2"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as excinfo:
        smoljax.load(saved)
    assert "model_type 'gpt2'" in one_line(excinfo)


# --- saving over an existing checkpoint ----------------------------------------------------------------------------


def test_saving_again_replaces_the_checkpoint_tokenizer_included(tmp_path):
    old_params, new_params = random_params(TINY, seed=1), random_params(TINY, seed=2)
    new_config = TINY.replace(rope_theta=50000.0)
    smoljax.save_pretrained(tmp_path, TINY, old_params, tiny_tokenizer())
    smoljax.save_pretrained(tmp_path, new_config, new_params, tiny_tokenizer())
    loaded = smoljax.load(tmp_path)
    assert loaded.config == new_config
    assert_trees_equal(loaded.params, new_params)
    assert loaded.tokenizer.encode("w1 w7 zz") == [4, 10, 0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


class DiskFull(OSError):
    pass


@pytest.mark.parametrize("max_shard_bytes", [None, 48 * 1024], ids=["single-file", "sharded"])
def test_save_failing_part_way_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch, max_shard_bytes):
    old_params, new_params = random_params(TINY, seed=1), random_params(TINY_UNTIED, seed=2)
    smoljax.save_pretrained(tmp_path, TINY, old_params, tiny_tokenizer(), max_shard_bytes=max_shard_bytes)
    before = snapshot(tmp_path)

    calls = []
    write_tensor_bytes = safetensors_io._write_tensor_bytes

    def fail_after_a_few(file, array):
        calls.append(1)
        if len(calls) > 5:
            raise DiskFull(28, "No space left on device")
        write_tensor_bytes(file, array)

    monkeypatch.setattr(safetensors_io, "_write_tensor_bytes", fail_after_a_few)
    with pytest.raises(DiskFull):
        smoljax.save_pretrained(tmp_path, TINY_UNTIED.replace(rope_theta=50000.0), new_params, tiny_tokenizer(),
                                max_shard_bytes=max_shard_bytes)
    monkeypatch.undo()

    assert snapshot(tmp_path) == before  # every file byte for byte, and no temp files
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = smoljax.load(tmp_path)
    assert loaded.config == TINY
    assert_trees_equal(loaded.params, old_params)
    assert loaded.tokenizer.encode("w1 w2") == [4, 5]
