"""LoRA: fresh adapters change nothing, the merge is the PEFT update in our layout, adapters saved by smoljax load
in PEFT with the same logits (and PEFT's own adapters load in smoljax), round trips are exact, gradients reach the
adapters, and bad configs or adapter files give one clear line.

Tolerances (tiny random model, logits of order 1):
- smoljax vs PEFT, 1e-5 absolute: both sides compute in f32 from identical weights. PEFT adds the update as a
  separate branch, x @ W.T + scale * (x @ A.T) @ B.T, while smoljax merges it first, x @ (W + scale * A @ B); the
  two differ only by the rounding of the f32 sums (~1e-7 relative per matmul), plus the reduction-order
  differences of test_save_load.py (~1e-7 over two layers). The adapters move the logits by more than 1e-1, so a
  transposed, misplaced or mis-scaled adapter is far outside the bound;
- the merge against a hand-computed numpy merge, 1e-6: one f32 rank-r matmul and one add, values of order 0.1;
- fresh adapters (B = 0) and save/load round trips: bit for bit.
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
peft = pytest.importorskip("peft")

import smoljax
from smoljax.checkpoints.hf_layout import _layer_param_to_hf, params_to_hf
from smoljax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from smoljax.config import LlamaConfig
from smoljax.errors import CheckpointError, ConfigError
from smoljax.models import smollm2
from smoljax.params import count_params, init_params, llama_specs
from smoljax.sharding import DEFAULT_RULES
from smoljax.training.lora import (TARGETS, LoraConfig, apply_lora, load_peft_adapter, lora_specs,
                                   save_peft_adapter)

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32")
TINY_UNTIED = TINY.replace(tie_word_embeddings=False)
CONFIGS = {"tied": TINY, "untied": TINY_UNTIED}
LORA = LoraConfig(rank=4, alpha=8.0)
LORA_QV = LoraConfig(rank=2, alpha=6.0, targets=("q_proj", "v_proj"))
ATOL_PEFT = 1e-5
ATOL_MERGE = 1e-6

forward = jax.jit(smollm2.forward, static_argnames=("config", "attn_impl", "remat"))
TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 12)).astype(np.int32)


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random weights, norms away from 1 (as in test_save_load.py)."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        if "norm" in spec.axes:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(spec.shape), jnp.float32)
        return jnp.asarray(0.08 * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(draw, llama_specs(config), is_leaf=lambda x: hasattr(x, "axes"))


def random_lora(config: LlamaConfig, lora: LoraConfig, seed: int = 1) -> dict:
    """Non-zero A and B, large enough that the adapters move the logits by much more than the tolerance."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.15 * rng.standard_normal(s.shape), jnp.float32),
                        lora_specs(config, lora), is_leaf=lambda x: hasattr(x, "axes"))


def our_logits(params, config, tokens=TOKENS) -> np.ndarray:
    return np.asarray(forward(params, jnp.asarray(tokens), config=config))


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def hf_base(directory: Path):
    return transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "errors must be one line"
    return message


# --- config and specs ----------------------------------------------------------------------------------------------


def test_lora_config_defaults_scale_and_canonical_targets():
    assert LoraConfig().targets == TARGETS and LoraConfig().scale == 2.0
    assert LoraConfig(rank=4, alpha=8).scale == 2.0
    assert LoraConfig(targets=["v_proj", "q_proj"]) == LoraConfig(targets=("q_proj", "v_proj"))


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": -1}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": "16"}, "alpha"), ({"targets": ()}, "empty"), ({"targets": "q_proj"}, "tuple"),
    ({"targets": ("q_proj", "lm_head")}, "'lm_head'"), ({"targets": ("q_proj", "q_proj")}, "twice"),
])
def test_bad_lora_config_is_one_line(kwargs, words):
    with pytest.raises(ConfigError) as excinfo:
        LoraConfig(**kwargs)
    assert words in one_line(excinfo)


def test_specs_shapes_axes_and_init():
    specs = lora_specs(TINY, LORA)
    assert set(specs) == set(TARGETS)
    L, r = TINY.num_hidden_layers, LORA.rank
    assert specs["q_proj"]["a"].shape == (L, 64, r) and specs["q_proj"]["b"].shape == (L, r, 64)
    assert specs["k_proj"]["b"].shape == (L, r, 32) and specs["o_proj"]["a"].shape == (L, 64, r)
    assert specs["down_proj"]["a"].shape == (L, 128, r) and specs["down_proj"]["b"].shape == (L, r, 64)
    for entry in specs.values():
        assert entry["a"].axes[0] == "layers" and entry["a"].axes[2] is None and entry["b"].axes[1] is None
        assert all(axis is None or axis in DEFAULT_RULES for part in entry.values() for axis in part.axes)
    lora_params = init_params(specs, jax.random.key(0))
    in_plus_out = {"q_proj": 128, "k_proj": 96, "v_proj": 96, "o_proj": 128, "gate_proj": 192, "up_proj": 192,
                   "down_proj": 192}
    assert count_params(lora_params) == L * r * sum(in_plus_out.values())
    for name, entry in lora_params.items():
        assert not np.any(np.asarray(entry["b"]))
        bound = 1 / np.sqrt(specs[name]["a"].shape[1])  # PEFT's kaiming_uniform(a=sqrt(5)) on [rank, in]
        a = np.asarray(entry["a"])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound


# --- merging -------------------------------------------------------------------------------------------------------


def test_fresh_adapters_leave_logits_unchanged():
    params = random_params(TINY)
    lora_params = init_params(lora_specs(TINY, LORA), jax.random.key(0))
    merged = apply_lora(params, lora_params, LORA)
    assert_trees_equal(merged, params)
    np.testing.assert_array_equal(our_logits(merged, TINY), our_logits(params, TINY))


@pytest.mark.parametrize("name", ["q_proj", "o_proj", "down_proj"])
def test_apply_lora_equals_hand_merged_weight(name):
    params, lora_params = random_params(TINY), random_lora(TINY, LORA)
    merged = jax.jit(apply_lora, static_argnums=2)(params, lora_params, LORA)
    assert merged["layers"][name].shape == params["layers"][name].shape
    for layer in range(TINY.num_hidden_layers):
        w_hf = _layer_param_to_hf(name, np.asarray(params["layers"][name][layer]))  # [out, in]
        a_hf = np.asarray(lora_params[name]["a"][layer]).T                             # [rank, in]
        b_hf = np.asarray(lora_params[name]["b"][layer]).T                             # [out, rank]
        want = w_hf + LORA.scale * (b_hf @ a_hf)
        got = _layer_param_to_hf(name, np.asarray(merged["layers"][name][layer]))
        np.testing.assert_allclose(got, want, atol=ATOL_MERGE, rtol=0)
    # outside jit, untouched parameters are passed through as they are
    eager = apply_lora(params, lora_params, LORA)
    assert eager["embed"] is params["embed"] and eager["layers"]["attn_norm"] is params["layers"]["attn_norm"]


def test_apply_lora_keeps_the_base_dtype_and_handles_vlm_trees():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(TINY))
    merged = apply_lora(params, random_lora(TINY, LORA_QV), LORA_QV)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
    vlm = {"vision": {"x": jnp.zeros(3)}, "connector": {"proj": jnp.ones(2)}, "text": params}
    merged_vlm = apply_lora(vlm, random_lora(TINY, LORA_QV), LORA_QV)
    assert merged_vlm["vision"] is vlm["vision"]
    assert_trees_equal(merged_vlm["text"], merged)


def test_apply_lora_rejects_adapters_of_another_model():
    params = random_params(TINY)
    other = random_lora(TINY.replace(intermediate_size=96), LORA)
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(params, other, LORA)
    assert "gate_proj" in one_line(excinfo) and "lora_specs" in one_line(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(params, random_lora(TINY, LORA_QV), LORA)
    assert "targets" in one_line(excinfo)


# --- gradients -----------------------------------------------------------------------------------------------------


def test_gradients_reach_a_and_b_and_leave_the_base_alone():
    params = random_params(TINY)
    base_copy = jax.tree.map(np.array, params)
    tokens = jnp.asarray(TOKENS)

    def loss(lora_params):
        logits = smollm2.forward(apply_lora(params, lora_params, LORA), tokens, TINY)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    fresh = init_params(lora_specs(TINY, LORA), jax.random.key(0))
    g = grad(fresh)
    for name in LORA.targets:  # B = 0: only B gets a gradient (dL/dA = scale * dL/dW @ B.T = 0)
        assert np.abs(np.asarray(g[name]["b"])).max() > 0
        assert not np.any(np.asarray(g[name]["a"]))
    g = grad(random_lora(TINY, LORA))
    for name in LORA.targets:
        for part in ("a", "b"):
            assert np.all(np.abs(np.asarray(g[name][part])).reshape(TINY.num_hidden_layers, -1).max(1) > 0)
    assert_trees_equal(params, base_copy)


# --- PEFT interoperability -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [LORA, LORA_QV], ids=["all-targets", "q-v"])
@pytest.mark.parametrize("tie", CONFIGS)
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, tie, lora):
    config = CONFIGS[tie]
    params, lora_params = random_params(config), random_lora(config, lora)
    smoljax.save_pretrained(tmp_path / "base", config, params)
    save_peft_adapter(tmp_path / "adapter", lora_params, lora, config, base_model="local/base")

    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "LORA" and saved_config["r"] == lora.rank
    assert saved_config["base_model_name_or_path"] == "local/base"

    ours = our_logits(apply_lora(params, lora_params, lora), config)
    assert np.max(np.abs(ours - our_logits(params, config))) > 0.1  # the adapters matter

    model = peft.PeftModel.from_pretrained(hf_base(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(hf_logits(model), ours, atol=ATOL_PEFT, rtol=0)
    merged_model = model.merge_and_unload()
    np.testing.assert_allclose(hf_logits(merged_model), ours, atol=ATOL_PEFT, rtol=0)
    # PEFT's merged weights are our merged weights, tensor for tensor
    hf_weights = merged_model.state_dict()
    for name, value in params_to_hf(apply_lora(params, lora_params, lora), config).items():
        np.testing.assert_allclose(hf_weights[name].numpy(), value, atol=ATOL_MERGE, rtol=0, err_msg=name)


def test_our_adapter_files_match_peft_own_save(tmp_path):
    """Same tensor names, shapes and dtypes as PEFT's `save_pretrained`, and every config key we write is one PEFT
    writes too; PEFT's own adapter (made non-zero) loads in smoljax with PEFT's logits."""
    params = random_params(TINY)
    smoljax.save_pretrained(tmp_path / "base", TINY, params)
    torch.manual_seed(0)
    peft_config = peft.LoraConfig(r=LORA_QV.rank, lora_alpha=6, target_modules=["v_proj", "q_proj"],
                                  lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_base(tmp_path / "base"), peft_config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.15)
    model.save_pretrained(tmp_path / "peft")

    lora_params, lora = load_peft_adapter(tmp_path / "peft", TINY)
    assert lora == LORA_QV
    save_peft_adapter(tmp_path / "ours", lora_params, lora, TINY)
    theirs_tensors = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    ours_tensors = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours_tensors.items()} == \
        {k: (v.shape, v.dtype) for k, v in theirs_tensors.items()}
    for name, value in theirs_tensors.items():
        np.testing.assert_array_equal(ours_tensors[name], value)
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours_config) <= set(theirs_config)
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])

    np.testing.assert_allclose(our_logits(apply_lora(params, lora_params, lora), TINY), hf_logits(model),
                               atol=ATOL_PEFT, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_save_load_round_trip_is_bitwise(tmp_path, dtype):
    lora_params = jax.tree.map(lambda x: x.astype(dtype), random_lora(TINY, LORA_QV))
    save_peft_adapter(tmp_path, lora_params, LORA_QV, TINY)
    loaded, lora = load_peft_adapter(tmp_path, TINY)
    assert lora == LORA_QV
    assert_trees_equal(loaded, lora_params)
    save_peft_adapter(tmp_path, lora_params, LORA_QV, TINY)  # saving again replaces the files, no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# --- bad adapter files ---------------------------------------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path) -> Path:
    directory = tmp_path / "adapter"
    save_peft_adapter(directory, random_lora(TINY, LORA), LORA, TINY)
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, words", [
    ({"use_dora": True}, "use_dora"),
    ({"use_rslora": True}, "use_rslora"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "'embed_tokens'"),
    ({"target_modules": ".*q_proj"}, "pattern"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"task_type": "SEQ_CLS"}, "SEQ_CLS"),
    ({"r": 0}, "rank"),
])
def test_unsupported_adapter_options_are_one_line(adapter, changes, words):
    edit_config(adapter, **changes)
    with pytest.raises(ConfigError) as excinfo:
        load_peft_adapter(adapter, TINY)
    message = one_line(excinfo)
    assert words in message and "adapter_config.json" in message


def test_all_linear_targets_are_accepted(adapter):
    edit_config(adapter, target_modules="all-linear")
    assert load_peft_adapter(adapter, TINY)[1] == LORA


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_adapter_file_is_named(adapter, missing):
    (adapter / missing).unlink()
    with pytest.raises(CheckpointError) as excinfo:
        load_peft_adapter(adapter, TINY)
    assert str(adapter / missing) in one_line(excinfo)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        load_peft_adapter(tmp_path / "nowhere", TINY)
    assert "nowhere" in one_line(excinfo)


def test_corrupt_adapter_files_are_named(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(CheckpointError) as excinfo:
        load_peft_adapter(adapter, TINY)
    assert str(weights) in one_line(excinfo)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(CheckpointError) as excinfo:
        load_peft_adapter(adapter, TINY)
    assert "not valid JSON" in one_line(excinfo)


@pytest.mark.parametrize("config, words", [
    (TINY.replace(intermediate_size=96), "has shape"),
    (TINY.replace(num_hidden_layers=3), "missing tensor 'base_model.model.model.layers.2."),
    (TINY.replace(num_hidden_layers=1), "unexpected tensor 'base_model.model.model.layers.1."),
])
def test_adapter_for_another_config_is_named(adapter, config, words):
    with pytest.raises(CheckpointError) as excinfo:
        load_peft_adapter(adapter, config)
    assert words in one_line(excinfo)


def test_adapter_with_extra_or_missing_tensors_is_named(adapter):
    weights = adapter / "adapter_model.safetensors"
    tensors = read_safetensors(weights)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors.pop(name)
    write_safetensors(adapter / "tmp", tensors)
    (adapter / "tmp" / "model.safetensors").replace(weights)
    with pytest.raises(CheckpointError) as excinfo:
        load_peft_adapter(adapter, TINY)
    assert "missing" in one_line(excinfo) and name in one_line(excinfo)


def test_saving_adapters_that_do_not_match_the_config_fails(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        save_peft_adapter(tmp_path, random_lora(TINY, LORA), LORA, TINY.replace(hidden_size=32, head_dim=8))
    assert "q_proj" in one_line(excinfo)
    with pytest.raises(ConfigError):
        save_peft_adapter(tmp_path, random_lora(TINY, LORA), LORA_QV, TINY)
    assert not list(tmp_path.iterdir())
