"""Model configs: frozen, hashable dataclasses that jitted functions take as static arguments.

`LlamaConfig` describes the SmolLM2 decoder (a LLaMA-style model). It reads and writes HF `config.json` and keeps
every field that changes the computation or the tokens around it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from smoljax.errors import ConfigError

# HF model types and architectures that are this decoder.
TEXT_MODEL_TYPES = ("llama",)
TEXT_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a SmolLM2 (LLaMA-style) decoder."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    # One id or several: generation stops at any of them.
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 2
    initializer_range: float = 0.041666666666666664
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention")
        if isinstance(self.eos_token_id, list):  # keep the dataclass hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ----

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Builds a config from an HF `config.json` dict; rejects models this decoder cannot run."""
        model_type = hf.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {model_type!r}: smoljax runs {', '.join(TEXT_MODEL_TYPES)} text models "
                "(SmolLM2); check that the checkpoint is a SmolLM2 model")
        architectures = hf.get("architectures") or list(TEXT_ARCHITECTURES)
        unknown = [a for a in architectures if a not in TEXT_ARCHITECTURES]
        if unknown:
            raise ConfigError(
                f"unknown architecture {unknown[0]!r}: smoljax runs {', '.join(TEXT_ARCHITECTURES)}")
        _reject_unsupported(hf)
        heads = _require(hf, "num_attention_heads")
        hidden = _require(hf, "hidden_size")
        head_dim = hf.get("head_dim")
        if head_dim is None and _is_positive_int(hidden) and _is_positive_int(heads):
            head_dim = hidden // heads  # otherwise __post_init__ names the bad size
        kv_heads = hf.get("num_key_value_heads")
        # transformers >= 5 writes rope_theta inside rope_parameters; older configs keep it at the top level.
        rope_parameters = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", 10000.0)
        fields = dict(
            vocab_size=_require(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(hf, "intermediate_size"),
            num_hidden_layers=_require(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict that transformers' LlamaForCausalLM loads as this model."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": list(TEXT_ARCHITECTURES),
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        return cls.from_hf_dict(read_config_json(path))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a config.json, turning a missing or malformed file into one clear line."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: a model directory needs its config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); re-download the model's config.json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ConfigError(f"config.json lacks {key!r}; it is needed to build the model")
    return hf[key]


def _reject_unsupported(hf: dict[str, Any]) -> None:
    """Fails loudly on options that would change the math in ways this decoder does not implement."""
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key)
        if scaling and (not isinstance(scaling, dict)
                        or scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
            raise ConfigError(f"{key} {scaling!r} is not supported: smoljax implements plain RoPE")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention_bias/mlp_bias are not supported: SmolLM2 checkpoints have no biases")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported: SmolLM2 uses silu")


# Real hub values (HuggingFaceTB/SmolLM2-*). The Instruct models use bos 1 / eos 2 (<|im_end|>); base models use 0.
_SMOLLM2_135M = LlamaConfig()
_SMOLLM2_360M = LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                            num_attention_heads=15, num_key_value_heads=5,
                            initializer_range=0.02)
_SMOLLM2_1_7B = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0,
                            initializer_range=0.02)


def _base(config: LlamaConfig) -> LlamaConfig:
    return config.replace(bos_token_id=0, eos_token_id=0, pad_token_id=None)


PRESETS: dict[str, LlamaConfig] = {
    "SmolLM2-135M": _base(_SMOLLM2_135M),
    "SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "SmolLM2-360M": _base(_SMOLLM2_360M),
    "SmolLM2-360M-Instruct": _SMOLLM2_360M,
    "SmolLM2-1.7B": _base(_SMOLLM2_1_7B),
    "SmolLM2-1.7B-Instruct": _SMOLLM2_1_7B,
}


def preset(name: str) -> LlamaConfig:
    """A preset by name, with or without the `HuggingFaceTB/` prefix, e.g. `preset("SmolLM2-360M")`."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
