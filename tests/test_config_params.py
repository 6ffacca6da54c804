"""Configs (HF config.json round trips against transformers' view, presets, one-line errors), the parameter spec
tree (shapes and counts of full-size models without allocating them), and the model as a pure function: jit, grad,
vmap, sharding, remat, padding and packing on a tiny random model.

Tolerances: 1e-5 absolute on logits of order 1 for computations that are the same math in a different order or
layout (vmap, sharding, remat, masking out padding or other documents). f32 rounding over two layers is ~1e-7, so
1e-5 leaves room for reordered reductions while still catching any masking or position error, which shifts logits
by 1e-2 or more.
"""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smoljax.config import PRESETS, LlamaConfig, preset
from smoljax.errors import ConfigError, InputError
from smoljax.models import smollm2
from smoljax.params import abstract_params, count_params, init_params, llama_specs

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
ATOL = 1e-5


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random weights drawn with numpy (jax's random init costs seconds of compilation here), norms included, so a
    mixed-up norm weight changes the output."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        if "norm" in spec.axes:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(spec.shape), jnp.float32)
        return jnp.asarray(0.08 * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(draw, llama_specs(config), is_leaf=lambda x: hasattr(x, "axes"))


@pytest.fixture(scope="module")
def params():
    return random_params(TINY)


def random_tokens(shape, seed: int = 1) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, shape), jnp.int32)


# One jitted forward for the whole file; the tests reuse a few sequence shapes so that compilations are shared.
forward = jax.jit(smollm2.forward, static_argnames=("config", "attn_impl", "remat"))


def next_token_loss(params, tokens, config=TINY, remat="none"):
    logits = smollm2.forward(params, tokens, config, remat=remat)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


# --- HF config.json ------------------------------------------------------------------------------------------------

# The real HuggingFaceTB/SmolLM2-135M-Instruct config.json (no head_dim: it is derived from hidden / heads).
HUB_135M_INSTRUCT_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": True, "vocab_size": 49152,
}

ROUND_TRIP_CONFIGS = {
    "tiny-tied": TINY,
    "tiny-untied-multi-eos": TINY.replace(tie_word_embeddings=False, eos_token_id=(2, 0), pad_token_id=None,
                                          rope_theta=5e5, max_position_embeddings=512, torch_dtype="float32"),
    "135M-Instruct": preset("SmolLM2-135M-Instruct"),
    "360M": preset("SmolLM2-360M"),
    "1.7B-Instruct": preset("SmolLM2-1.7B-Instruct"),
}


def test_hub_config_json_gives_the_preset():
    assert LlamaConfig.from_hf_dict(HUB_135M_INSTRUCT_CONFIG) == preset("SmolLM2-135M-Instruct")


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_hf_dict_round_trip_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    config = ROUND_TRIP_CONFIGS[name]
    hf_dict = config.to_hf_dict()
    assert LlamaConfig.from_hf_dict(hf_dict) == config
    assert LlamaConfig.from_hf_dict(json.loads(json.dumps(hf_dict))) == config  # through JSON (lists, floats)

    theirs = transformers.LlamaConfig(**hf_dict)
    rope_theta = (theirs.rope_parameters["rope_theta"] if getattr(theirs, "rope_parameters", None)
                  else theirs.rope_theta)
    assert rope_theta == config.rope_theta
    assert theirs.head_dim == config.head_dim
    assert theirs.tie_word_embeddings == config.tie_word_embeddings
    assert theirs.max_position_embeddings == config.max_position_embeddings
    assert theirs.bos_token_id == config.bos_token_id
    assert theirs.pad_token_id == config.pad_token_id
    eos = theirs.eos_token_id
    assert (tuple(eos) if isinstance(eos, list) else eos) == config.eos_token_id
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps"):
        assert getattr(theirs, field) == getattr(config, field), field

    # And back: the dict transformers writes (rope_theta inside rope_parameters since v5) gives the same config.
    assert LlamaConfig.from_hf_dict(theirs.to_dict()) == config


def test_json_file_round_trip(tmp_path):
    config = ROUND_TRIP_CONFIGS["tiny-untied-multi-eos"]
    config.to_json_file(tmp_path / "config.json")
    assert LlamaConfig.from_json_file(tmp_path / "config.json") == config


# --- presets -------------------------------------------------------------------------------------------------------

# name -> (hidden, layers, heads, kv heads, intermediate, vocab, rope_theta): the values of the hub config.json files.
REAL_PRESET_VALUES = {
    "SmolLM2-135M": (576, 30, 9, 3, 1536, 49152, 100000.0),
    "SmolLM2-360M": (960, 32, 15, 5, 2560, 49152, 100000.0),
    "SmolLM2-1.7B": (2048, 24, 32, 32, 8192, 49152, 130000.0),
}


@pytest.mark.parametrize("name", REAL_PRESET_VALUES)
@pytest.mark.parametrize("suffix", ["", "-Instruct"])
def test_presets_have_the_real_values(name, suffix):
    config = preset(name + suffix)
    hidden, layers, heads, kv_heads, mlp, vocab, theta = REAL_PRESET_VALUES[name]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.rope_theta) == (
                hidden, layers, heads, kv_heads, mlp, vocab, theta)
    assert config.head_dim == 64 and config.tie_word_embeddings and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 8192
    # Instruct models: bos 1, eos 2 (<|im_end|>); base models: 0 for both.
    assert (config.bos_token_id, config.eos_token_id) == ((1, 2) if suffix else (0, 0))


def test_preset_accepts_the_hub_prefix():
    assert preset("HuggingFaceTB/SmolLM2-360M") == PRESETS["SmolLM2-360M"]
    assert preset("HuggingFaceTB/SmolLM2-360M").hidden_size == 960
    with pytest.raises(ConfigError, match="SmolLM2-135M"):
        preset("SmolLM2-7B")


# --- hashable, static under jit -------------------------------------------------------------------------------------


def test_config_is_hashable_and_a_static_jit_argument(params):
    equal_copy = TINY.replace()
    assert equal_copy is not TINY and hash(equal_copy) == hash(TINY) and equal_copy == TINY
    assert len({TINY, equal_copy, TINY.replace(rope_theta=5e5)}) == 2

    traces = []

    @functools.partial(jax.jit, static_argnames="config")
    def run(params, tokens, config):
        traces.append(config)
        return smollm2.forward(params, tokens, config)

    tokens = random_tokens((1, 12))
    first = run(params, tokens, TINY)
    run(params, tokens, equal_copy)
    assert len(traces) == 1  # an equal config reuses the compiled program
    other = run(params, tokens, TINY.replace(rope_theta=5e5))
    assert len(traces) == 2
    assert np.max(np.abs(np.asarray(first) - np.asarray(other))) > 1e-3  # and the field reaches the math


# --- errors --------------------------------------------------------------------------------------------------------

BAD_HF_DICTS = {
    "unknown model_type": ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    "missing model_type": ({"model_type": None}, "model_type None"),
    "unknown architecture": ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    "missing hidden_size": ({"hidden_size": ...}, "'hidden_size'"),
    "missing vocab_size": ({"vocab_size": ...}, "'vocab_size'"),
    "zero layers": ({"num_hidden_layers": 0}, "num_hidden_layers"),
    "negative vocab": ({"vocab_size": -5}, "vocab_size"),
    "zero heads, no head_dim": ({"num_attention_heads": 0, "head_dim": ...}, "num_attention_heads"),
    "zero kv heads": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "string size": ({"intermediate_size": "128"}, "intermediate_size"),
    "heads not divisible": ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    "rope_scaling linear": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    "rope_scaling llama3": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    "rope_parameters yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
    "attention bias": ({"attention_bias": True}, "attention_bias"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
}


@pytest.mark.parametrize("name", BAD_HF_DICTS)
def test_bad_hf_config_raises_one_clear_config_error(name):
    changes, fragment = BAD_HF_DICTS[name]
    hf = TINY.to_hf_dict()
    for key, value in changes.items():
        if value is ...:
            hf.pop(key, None)
        else:
            hf[key] = value
    with pytest.raises(ConfigError) as excinfo:
        LlamaConfig.from_hf_dict(hf)
    message = str(excinfo.value)
    assert fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("num_hidden_layers", -1), ("head_dim", 0),
                                          ("vocab_size", 2.5), ("num_key_value_heads", True)])
def test_bad_sizes_raise_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        TINY.replace(**{field: value})


@pytest.mark.parametrize("content, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                               (b"\xff\xfe\x00", "not valid JSON")])
def test_bad_config_json_file(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as excinfo:
        LlamaConfig.from_json_file(path)
    assert fragment in str(excinfo.value) and str(path) in str(excinfo.value)


def test_missing_config_json_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        LlamaConfig.from_json_file(tmp_path / "config.json")


# --- spec tree: shapes and counts of full-size models ---------------------------------------------------------------


def expected_shapes(config: LlamaConfig) -> dict:
    """Shapes from the architecture (see the layout in smoljax.params), written out independently of it."""
    hidden, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {
        "embed": (config.vocab_size, hidden),
        "layers": {"attn_norm": (layers, hidden), "q_proj": (layers, hidden, q, d), "k_proj": (layers, hidden, kv, d),
                   "v_proj": (layers, hidden, kv, d), "o_proj": (layers, q, d, hidden),
                   "mlp_norm": (layers, hidden), "gate_proj": (layers, hidden, mlp), "up_proj": (layers, hidden, mlp),
                   "down_proj": (layers, mlp, hidden)},
        "final_norm": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (hidden, config.vocab_size)
    return shapes


def expected_count(config: LlamaConfig) -> int:
    """embed + layers x (attention + MLP + two norms) + final norm (+ untied head)."""
    hidden, q_dim = config.hidden_size, config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    per_layer = attention + 3 * hidden * config.intermediate_size + 2 * hidden
    head = 0 if config.tie_word_embeddings else hidden * config.vocab_size
    return config.vocab_size * hidden + config.num_hidden_layers * per_layer + hidden + head


@pytest.mark.parametrize("name, known_count", [("SmolLM2-135M-Instruct", 134_515_008),
                                               ("SmolLM2-360M", 361_821_120),
                                               ("SmolLM2-1.7B", 1_711_376_384)])
@pytest.mark.parametrize("tied", [True, False])
def test_eval_shape_of_full_size_init(name, known_count, tied):
    config = preset(name).replace(tie_word_embeddings=tied)
    specs = llama_specs(config)
    shapes = jax.eval_shape(functools.partial(init_params, specs), jax.random.key(0))
    assert jax.tree.map(lambda x: tuple(x.shape), shapes) == expected_shapes(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(specs)) == jax.tree.map(
        lambda x: (x.shape, x.dtype), shapes)
    assert count_params(shapes) == expected_count(config)
    assert count_params(shapes) == known_count + (0 if tied else config.vocab_size * config.hidden_size)


def test_bf16_specs_give_bf16_params(params):
    # eval_shape traces the real initializers, so this is the dtype init_params produces, without computing it.
    for config in (preset("SmolLM2-360M"), TINY):
        shapes = jax.eval_shape(functools.partial(init_params, llama_specs(config, jnp.bfloat16)), jax.random.key(0))
        assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    # bf16 weights run and give f32 logits close to the f32 model's: bf16 rounds weights and activations to 8
    # mantissa bits (relative 4e-3 each), so logits of magnitude ~2 may move by a few 1e-2, never by 0.2.
    tokens = random_tokens((2, 12))
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits = forward(bf16_params, tokens, config=TINY)
    reference = np.asarray(forward(params, tokens, config=TINY))
    assert logits.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(logits) - reference)) < 0.2


# --- the model as a pure function ---------------------------------------------------------------------------------


def test_ahead_of_time_compiled_forward(params):
    tokens = random_tokens((2, 12))
    compiled = forward.lower(params, tokens, config=TINY).compile()
    logits = compiled(params, tokens)
    assert logits.shape == (2, 12, TINY.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(forward(params, tokens, config=TINY)))


# Module-level so each (config, remat) pair compiles once.
loss_grad = jax.jit(jax.grad(next_token_loss), static_argnames=("config", "remat"))


def loss_value(params, tokens) -> float:
    """next_token_loss in float64 numpy from the shared compiled forward (no extra compilation)."""
    logits = np.asarray(forward(params, tokens, config=TINY), np.float64)[:, :-1]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return -float(np.mean(np.take_along_axis(log_probs, np.asarray(tokens)[:, 1:, None], axis=-1)))


@pytest.fixture(scope="module")
def grads(params):
    """Gradients of the next-token loss on random_tokens((2, 12)), without remat."""
    return loss_grad(params, random_tokens((2, 12)))


def test_grad_is_finite_with_the_params_structure_and_matches_finite_differences(params, grads):
    tokens = random_tokens((2, 12))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # every parameter gets a gradient

    # Directional derivative along a random unit direction vs a central difference. In f32, with eps = 1e-2 the
    # difference quotient's rounding error is ~1e-7 * loss / eps ~ 1e-4 and its truncation error O(eps^2); a 2%
    # relative bound catches a wrong gradient while allowing for both.
    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    norm = math.sqrt(sum(float(jnp.sum(d * d)) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-2
    plus = loss_value(jax.tree.map(lambda p, d: p + eps * d, params, direction), tokens)
    minus = loss_value(jax.tree.map(lambda p, d: p - eps * d, params, direction), tokens)
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 0.02 * abs(analytic)


@pytest.mark.parametrize("layout", ["stacked", "fused"])
def test_prompt_with_the_norm_folded_into_the_projections_equals_the_plain_norm(params, monkeypatch, layout):
    """A prompt of FOLD_NORM_MIN_TOKENS or more written into the cache scales the projections by the norm weights
    and their outputs by 1/rms; the logits and the cache must equal the plain norm's. A decode step never folds."""
    from smoljax.cache import init_cache
    from smoljax.generation import decode_step, prefill

    tokens = random_tokens((2, 12))
    segments = jnp.asarray([[0] * 3 + [1] * 9, [1] * 12], jnp.int32)  # one left-padded row
    model_params = smollm2.fuse_projections(params) if layout == "fused" else params
    results, programs, steps = {}, {}, {}
    for fold in (False, True):
        monkeypatch.setattr(smollm2, "FOLD_NORM_MIN_TOKENS", 1 if fold else 10**9)

        def prompt(p):  # a fresh function each time: jax caches traces by function
            return prefill(p, tokens, segments, init_cache(TINY, 2, 16, jnp.float32), TINY, empty_cache=True)

        def step(p, cache):
            return decode_step(p, tokens[:, 0], jnp.asarray([9, 12]), cache, TINY)

        results[fold] = jax.jit(prompt)(model_params)
        programs[fold] = str(jax.make_jaxpr(prompt)(model_params))
        steps[fold] = str(jax.make_jaxpr(step)(model_params, results[fold][1]))
    assert programs[True] != programs[False]  # the threshold really switches the computation
    assert steps[True] == steps[False]
    for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)


def test_vmap_over_single_sequences_equals_batched_forward(params):
    tokens = random_tokens((2, 12))
    batched = forward(params, tokens, config=TINY)
    mapped = jax.jit(jax.vmap(lambda row: smollm2.forward(params, row[None], TINY)[0]))(tokens)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(batched), atol=ATOL, rtol=0)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_attention", "save_attn_mlp"])
def test_remat_policies_give_the_same_gradients(params, grads, remat):
    tokens = random_tokens((2, 12))
    grad_fn = jax.grad(functools.partial(next_token_loss, remat=remat))
    assert "remat" in str(jax.make_jaxpr(grad_fn)(params, tokens))  # the policy is really applied
    rematted = loss_grad(params, tokens, remat=remat)
    for got, want in zip(jax.tree.leaves(rematted), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)


def test_no_remat_means_no_remat_in_the_jaxpr(params):
    tokens = random_tokens((2, 12))
    assert "remat" not in str(jax.make_jaxpr(jax.grad(next_token_loss))(params, tokens))


def test_left_padded_batch_equals_unpadded_rows(params):
    rows = [np.asarray(random_tokens((1, n), seed=n))[0].tolist() for n in (5, 7, 12)]
    length = 12
    tokens = np.full((len(rows), length), 3, np.int32)  # pad id 3: its value must not matter
    segments = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        segments[i, length - len(row):] = 1
    padded = np.asarray(forward(params, jnp.asarray(tokens), config=TINY, segment_ids=jnp.asarray(segments)))
    for i, row in enumerate(rows):
        alone = np.asarray(forward(params, jnp.asarray([row]), config=TINY))[0]
        np.testing.assert_allclose(padded[i, length - len(row):], alone, atol=ATOL, rtol=0)
    # Were the padding attended to (all segment ids 1), the short rows would change.
    unmasked = np.asarray(forward(params, jnp.asarray(tokens), config=TINY,
                                  segment_ids=jnp.ones_like(jnp.asarray(segments))))
    assert np.max(np.abs(unmasked[0, -5:] - padded[0, -5:])) > 1e-3


def test_packed_documents_do_not_attend_across(params):
    doc1 = np.asarray(random_tokens((1, 5), seed=11))[0]
    doc2 = np.asarray(random_tokens((1, 7), seed=12))[0]
    packed = np.concatenate([doc1, doc2, [0, 0, 0, 0]])[None].astype(np.int32)
    segments = np.asarray([[1] * 5 + [2] * 7 + [0] * 4], np.int32)
    logits = np.asarray(forward(params, jnp.asarray(packed), config=TINY, segment_ids=jnp.asarray(segments)))
    alone1 = np.asarray(forward(params, jnp.asarray(doc1[None]), config=TINY))[0]
    alone2 = np.asarray(forward(params, jnp.asarray(doc2[None]), config=TINY))[0]
    np.testing.assert_allclose(logits[0, :5], alone1, atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[0, 5:12], alone2, atol=ATOL, rtol=0)
    # As one document, doc 2 would see doc 1.
    joined = np.asarray(forward(params, jnp.asarray(packed[:, :12]), config=TINY))[0]
    assert np.max(np.abs(joined[5:12] - alone2)) > 1e-3


@pytest.mark.parametrize("bad_id", [TINY.vocab_size, -1, 10**6])
def test_token_ids_out_of_range_raise_input_error(params, bad_id):
    from smoljax import generation
    from smoljax.scoring import token_logprobs

    tokens = [5, bad_id, 7]
    with pytest.raises(InputError, match=str(bad_id)):
        smollm2.forward(params, jnp.asarray([tokens]), TINY)
    with pytest.raises(InputError, match="out of range"):
        generation.generate(params, TINY, [tokens], max_new_tokens=2)
    with pytest.raises(InputError, match="out of range"):
        token_logprobs(params, TINY, tokens)


# --- sharding over an 8-device CPU mesh (a subprocess: the device count is fixed when jax starts) -----------------

SHARDING_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from smoljax.config import LlamaConfig
    from smoljax.models import smollm2
    from smoljax.params import llama_specs
    from smoljax.sharding import param_shardings

    assert jax.device_count() == 8, jax.devices()
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    specs = llama_specs(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.08 * rng.standard_normal(s.shape), jnp.float32), specs,
                          is_leaf=lambda x: hasattr(x, "axes"))
    tokens = jnp.asarray(rng.integers(0, 256, (4, 16)), jnp.int32)
    reference = np.asarray(jax.jit(smollm2.forward, static_argnames="config")(params, tokens, config=config))

    # FSDP over "fsdp" (the embedding dimension) and tensor parallelism over "tensor" (heads, MLP, vocab).
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    sharded = jax.device_put(params, param_shardings(specs, mesh))
    sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec("fsdp", None)))
    logits = jax.jit(smollm2.forward, static_argnames="config")(sharded, sharded_tokens, config=config)
    q_shard = sharded["layers"]["q_proj"].addressable_shards[0].data.shape
    print(json.dumps({"max_diff": float(np.max(np.abs(np.asarray(logits) - reference))),
                      "q_proj_shard": list(q_shard), "devices": len(logits.sharding.device_set)}))
""")


def test_sharded_forward_equals_unsharded(tmp_path):
    script = tmp_path / "sharded_forward.py"
    script.write_text(SHARDING_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["q_proj_shard"] == [2, 16, 2, 16]  # [layers, embed / fsdp, q_heads / tensor, head_dim]
    assert result["max_diff"] <= ATOL


def test_sharding_rejects_a_mesh_that_does_not_divide():
    from smoljax.errors import ConfigError
    from smoljax.params import llama_specs
    from smoljax.sharding import partition_spec

    class FakeMesh:  # only `shape` is read, so no devices are needed
        def __init__(self, tensor: int):
            self.shape = {"fsdp": 1, "tensor": tensor}

    spec = llama_specs(TINY)["layers"]["q_proj"]  # [layers, embed, 4 q_heads, head_dim]
    with pytest.raises(ConfigError, match="does not divide"):
        partition_spec(spec, FakeMesh(3), {"q_heads": "tensor"})
    with pytest.raises(ConfigError, match="two axes"):
        partition_spec(spec, FakeMesh(2), {"q_heads": "tensor", "head_dim": "tensor"})
