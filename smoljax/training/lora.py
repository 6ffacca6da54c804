"""LoRA adapters for the SmolLM2 decoder, as pure functions over pytrees, and PEFT-compatible adapter files.

A LoRA adapter adds a low-rank update to each targeted projection: W' = W + scale * A @ B with A [in, rank],
B [rank, out] and scale = alpha / rank, `in`/`out` being the flattened HF in/out features of the projection. Like
the base layers, adapters are stacked over layers on a leading axis:

    lora_params = {"q_proj": {"a": [L, hidden, rank], "b": [L, rank, q_heads * head_dim]},
                   "o_proj": {"a": [L, q_heads * head_dim, rank], "b": [L, rank, hidden]},
                   "down_proj": {"a": [L, mlp, rank], "b": [L, rank, hidden]}, ...}      # one entry per target

    lora = LoraConfig(rank=8, alpha=16.0)
    lora_params = init_params(lora_specs(config, lora), key)       # B = 0: the adapted model equals the base
    loss = lambda lp: loss_fn(apply_lora(params, lp, lora), batch)  # merge on the fly; grad w.r.t. lp only
    merged = apply_lora(params, lora_params, lora)                  # "merge for export": save_pretrained(merged)
    save_peft_adapter(directory, lora_params, lora, config)         # PeftModel.from_pretrained loads it

Merging on the fly costs one [in, rank] x [rank, out] matmul per target and layer, far less than the forward pass
over a batch, and keeps `smollm2.forward` untouched. Gradients flow only into `lora_params`: the base weights enter
as constants (pass them to the loss as a closed-over value or a non-differentiated argument).

PEFT layout: PEFT stores `lora_A.weight` [rank, in] and `lora_B.weight` [out, rank] and adds scale * B @ A to the
HF weight [out, in]; in our [in, out] layout that is scale * A_ours @ B_ours with A_ours = lora_A.T and
B_ours = lora_B.T, which is what the adapter files hold once transposed.

SmolVLM2: LoRA adapts the text decoder. Build the specs from `config.text`; `apply_lora` given a whole VLM tree
({"vision", "connector", "text"}) merges into `params["text"]` and leaves the rest as it is. PEFT adapter files
are written and read for SmolLM2 (`LlamaForCausalLM`) only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from smoljax.config import LlamaConfig
from smoljax.errors import CheckpointError, ConfigError
from smoljax.params import ParamSpec, zeros_init

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha (the update is scaled by alpha / rank, as in PEFT) and the projections to adapt.

    `targets` is kept in the canonical order of `TARGETS`, so two configs naming the same modules are equal.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.integer, np.floating))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list, set, frozenset)):
            raise ConfigError(f"LoRA targets must be a tuple of module names such as ('q_proj', 'v_proj'), "
                              f"got {targets!r}")
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
        if not targets:
            raise ConfigError(f"LoRA targets are empty; name at least one of {', '.join(TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"LoRA targets {tuple(targets)} name a module twice; list each once")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_features(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Target name -> (in, out) features of the projection, as in HF's `nn.Linear(in, out)`."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    return {"q_proj": (hidden, q_dim), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim),
            "o_proj": (q_dim, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp),
            "down_proj": (mlp, hidden)}


# Logical axes of each target's (in, out) features, matching the base weights' (see smoljax.params), so the
# sharding rules split an adapter like the weight it adapts. The rank axis is replicated (None).
_FEATURE_AXES = {"q_proj": ("embed", "q_heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
                 "o_proj": ("q_heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
                 "down_proj": ("mlp", "embed")}


def _kaiming_uniform_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """PEFT's A init: torch's kaiming_uniform_(a=sqrt(5)) on lora_A [rank, in], i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[-2])  # shape is [L, in, rank]
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def lora_specs(config: LlamaConfig, lora: LoraConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The ParamSpec tree of the adapters: {target: {"a": [L, in, rank], "b": [L, rank, out]}}.

    A is initialised as PEFT does and B to zeros, so freshly initialised adapters leave the model unchanged.
    """
    _check_llama_config(config)
    layers, rank = config.num_hidden_layers, lora.rank
    features = lora_features(config)
    tree = {}
    for name in lora.targets:
        (n_in, n_out), (in_axis, out_axis) = features[name], _FEATURE_AXES[name]
        tree[name] = {
            "a": ParamSpec((layers, n_in, rank), ("layers", in_axis, None), _kaiming_uniform_init, dtype),
            "b": ParamSpec((layers, rank, n_out), ("layers", None, out_axis), zeros_init, dtype),
        }
    return tree


def apply_lora(params: dict[str, Any], lora_params: dict[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """The base params with W + scale * A @ B merged into every adapted projection, in the base layout and dtype.

    Pure and jittable; differentiable w.r.t. `lora_params` (and `params`). The merge runs batched over the stacked
    layers in f32 (or wider) at highest matmul precision, then casts to each base weight's dtype. Non-adapted
    parameters are returned as the same objects. A SmolVLM2 tree gets the adapters merged into its "text" decoder.
    """
    if "layers" not in params and "text" in params:
        return {**params, "text": apply_lora(params["text"], lora_params, lora)}
    if "layers" not in params:
        raise ConfigError("apply_lora expects a SmolLM2 parameter tree (with 'layers') or a SmolVLM2 tree "
                          "(with 'text'); pass the model params")
    layers = dict(params["layers"])
    if "q_proj" not in layers:
        raise ConfigError("apply_lora needs the unfused layer layout; merge adapters before fuse_projections")
    _check_lora_targets(lora_params, lora)
    for name in lora.targets:
        weight = layers[name]
        a, b = lora_params[name]["a"], lora_params[name]["b"]
        in_dims = 2 if name == "o_proj" else 1  # o_proj is [L, heads, head_dim, hidden]; the rest [L, in, ...]
        layer_count = weight.shape[0]
        n_in, n_out = math.prod(weight.shape[1:1 + in_dims]), math.prod(weight.shape[1 + in_dims:])
        expected_a, expected_b = (layer_count, n_in, lora.rank), (layer_count, lora.rank, n_out)
        for part, value, expected in (("a", a, expected_a), ("b", b, expected_b)):
            if tuple(value.shape) != expected:
                raise ConfigError(
                    f"lora_params[{name!r}][{part!r}] has shape {tuple(value.shape)} but the model's {name} "
                    f"{tuple(weight.shape)} with rank {lora.rank} needs {expected}; build the adapters with "
                    "lora_specs(config, lora) for this model")
        compute = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
        delta = jnp.einsum("lir,lro->lio", a.astype(compute), b.astype(compute),
                           precision=jax.lax.Precision.HIGHEST)
        merged = weight.astype(jnp.promote_types(weight.dtype, compute)) + lora.scale * delta.reshape(weight.shape)
        layers[name] = merged.astype(weight.dtype)
    return {**params, "layers": layers}


def _check_lora_targets(lora_params: Any, lora: LoraConfig) -> None:
    if not isinstance(lora_params, dict) or set(lora_params) != set(lora.targets):
        found = sorted(lora_params) if isinstance(lora_params, dict) else type(lora_params).__name__
        raise ConfigError(f"lora_params hold {found} but the LoraConfig targets {list(lora.targets)}; "
                          "use the LoraConfig the adapters were built with")
    for name in lora.targets:
        entry = lora_params[name]
        if not isinstance(entry, dict) or set(entry) != {"a", "b"}:
            raise ConfigError(f"lora_params[{name!r}] should be {{'a': ..., 'b': ...}}; build the adapters with "
                              "lora_specs(config, lora)")


def _check_llama_config(config: Any) -> None:
    if not isinstance(config, LlamaConfig):
        raise ConfigError(f"LoRA adapters need a LlamaConfig, got {type(config).__name__}; for a SmolVLM2 pass "
                          "config.text")


def _peft_name(layer: int, name: str, part: str) -> str:
    block = "self_attn" if name in ATTENTION_TARGETS else "mlp"
    return f"{PEFT_PREFIX}{layer}.{block}.{name}.lora_{part.upper()}.weight"


def _expected_peft_shapes(config: LlamaConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    features = lora_features(config)
    shapes = {}
    for layer in range(config.num_hidden_layers):
        for name in lora.targets:
            n_in, n_out = features[name]
            shapes[_peft_name(layer, name, "a")] = (lora.rank, n_in)
            shapes[_peft_name(layer, name, "b")] = (n_out, lora.rank)
    return shapes


def save_peft_adapter(directory: str | os.PathLike, lora_params: dict[str, Any], lora: LoraConfig,
                      config: LlamaConfig, base_model: str | None = None) -> Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads
    onto a transformers `LlamaForCausalLM` of `config`. Tensors keep the adapters' dtype. `base_model` is recorded
    as `base_model_name_or_path` (a hub id or path of the base model). Files are written to temp files and renamed
    into place. Returns the directory.
    """
    from smoljax.checkpoints.safetensors_io import _as_little_endian, _write_safetensors_temp, _write_temp_file

    _check_llama_config(config)
    _check_lora_targets(lora_params, lora)
    specs = lora_specs(config, lora)
    tensors: dict[str, np.ndarray] = {}
    for name in lora.targets:
        for part in ("a", "b"):
            value = np.asarray(lora_params[name][part])
            if value.shape != specs[name][part].shape:
                raise ConfigError(f"lora_params[{name!r}][{part!r}] has shape {value.shape}, expected "
                                  f"{specs[name][part].shape} for this config and rank {lora.rank}; save with the "
                                  "config and LoraConfig the adapters were built with")
            for layer in range(config.num_hidden_layers):
                key = _peft_name(layer, name, part)
                tensors[key] = _as_little_endian(key, np.ascontiguousarray(value[layer].T))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    config_bytes = (json.dumps(adapter_config, indent=2) + "\n").encode()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_temp = _write_safetensors_temp(directory, ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
    try:
        config_temp = _write_temp_file(directory, ADAPTER_CONFIG_NAME, lambda file: file.write(config_bytes))
    except BaseException:
        weights_temp.unlink(missing_ok=True)
        raise
    os.replace(weights_temp, directory / ADAPTER_WEIGHTS_NAME)
    os.replace(config_temp, directory / ADAPTER_CONFIG_NAME)
    return directory


# adapter_config.json options smoljax cannot honour: each must be absent or empty/false/None.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA adapters are not supported",
    "use_rslora": "rank-stabilised LoRA (use_rslora) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "modules_to_save": "fully trained extra modules (modules_to_save) are not supported",
    "layers_to_transform": "adapting only some layers (layers_to_transform) is not supported",
    "layer_replication": "layer replication is not supported",
    "exclude_modules": "exclude_modules is not supported",
    "target_parameters": "target_parameters is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "alora_invocation_tokens": "activated LoRA (alora) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "fan_in_fan_out": "fan_in_fan_out weights are not supported",
}


def load_peft_adapter(directory: str | os.PathLike, config: LlamaConfig, dtype: Any = None,
                      ) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter directory (ours or PEFT's own `save_pretrained`) for a model of `config`:
    (lora_params in our layout, LoraConfig). `dtype` casts the arrays (default: the stored dtype).

    Adapters with options smoljax does not implement (DoRA, rsLoRA, per-module ranks, biases, modules_to_save,
    ...) are refused with a ConfigError; missing, corrupt or mismatched files with a CheckpointError.
    """
    from smoljax.checkpoints.safetensors_io import read_safetensors
    from smoljax.jsonfiles import read_json_object

    _check_llama_config(config)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass the directory holding {ADAPTER_CONFIG_NAME} "
                              f"and {ADAPTER_WEIGHTS_NAME}")
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist; pass a PEFT adapter directory (saved by "
                              "save_peft_adapter or PeftModel.save_pretrained)")
    hf = read_json_object(config_path)
    lora = _lora_config_from_peft(hf, config_path)

    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        hint = ("; re-save it with safe_serialization=True" if (directory / "adapter_model.bin").is_file()
                else "; re-save the adapter")
        raise CheckpointError(f"{weights_path} does not exist{hint}")
    tensors = read_safetensors(weights_path)
    expected = _expected_peft_shapes(config, lora)
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{weights_path} is missing tensor {missing[0]!r}{more}; the adapter does not match "
                              f"this model config ({config.num_hidden_layers} layers) or its target_modules")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{weights_path} has unexpected tensor {unexpected[0]!r}{more}; the adapter was made "
                              "for another model or with options smoljax does not support")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {shape} for this model config and r={lora.rank}; the adapter was made "
                                  "for another model, load it with that model's config")
    lora_params = {}
    for name in lora.targets:
        entry = {}
        for part in ("a", "b"):
            stacked = np.stack([tensors[_peft_name(layer, name, part)].T
                                for layer in range(config.num_hidden_layers)])
            entry[part] = jnp.asarray(stacked, dtype=dtype)
        lora_params[name] = entry
    return lora_params, lora


def _lora_config_from_peft(hf: dict[str, Any], path: Path) -> LoraConfig:
    peft_type = hf.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{path} has peft_type {peft_type!r}; only LoRA adapters (peft_type 'LORA') are supported")
    task_type = hf.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise ConfigError(f"{path} has task_type {task_type!r}; only causal LM adapters (CAUSAL_LM) are supported")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if hf.get(key) not in (None, False, {}, [], ""):
            raise ConfigError(f"{path} sets {key}={hf[key]!r}: {what} by smoljax; train the adapter without it")
    bias = hf.get("bias", "none")
    if bias != "none":
        raise ConfigError(f"{path} sets bias={bias!r}: adapters with biases are not supported by smoljax; "
                          "train the adapter with bias='none'")
    targets = hf.get("target_modules")
    if targets == "all-linear":
        targets = list(TARGETS)
    elif isinstance(targets, str):
        raise ConfigError(f"{path} gives target_modules as the pattern {targets!r}; only a list of module names "
                          f"({', '.join(TARGETS)}) is supported")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{path} has no valid target_modules (a list of module names); re-save the adapter")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"{path} targets module {unknown[0]!r}, which smoljax cannot adapt; supported: "
                          f"{', '.join(TARGETS)}")
    try:
        return LoraConfig(rank=hf.get("r"), alpha=hf.get("lora_alpha"), targets=tuple(dict.fromkeys(targets)))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
