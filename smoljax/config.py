"""Model configs: frozen, hashable dataclasses that jitted functions take as static arguments.

`LlamaConfig` describes the SmolLM2 decoder (a LLaMA-style model). `VisionConfig` describes SmolVLM2's SigLIP
encoder and `VLMConfig` the whole SmolVLM2 (encoder + pixel-shuffle connector + a SmolLM2 decoder). Each reads and
writes HF `config.json` and keeps every field that changes the computation or the tokens around it.
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
        _check_positive_ints(self, "config", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "head_dim",
                                              "max_position_embeddings"))
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


def _check_positive_ints(config: Any, what: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_positive_int(value):
            raise ConfigError(f"{what} field {name} must be a positive integer, got {value!r}")


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


# HF model types of SmolVLM2 (`smolvlm`) and of its Idefics3 ancestor, which has the same layout.
VLM_MODEL_TYPES = ("smolvlm", "idefics3")
VLM_ARCHITECTURES = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
VISION_MODEL_TYPES = ("smolvlm_vision", "idefics3_vision")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of SmolVLM2's SigLIP vision encoder (defaults: the 256M/500M models' encoder)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 512
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "smolvlm_vision"

    def __post_init__(self) -> None:
        _check_positive_ints(self, "vision config", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_channels", "image_size",
                                                     "patch_size"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported: SigLIP uses "
                              "gelu_pytorch_tanh (the tanh approximation of GELU)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        """Patches along a tile's edge; like the strided conv it replaces, it drops a remainder (384 px / 14 -> 27)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "VisionConfig":
        """Reads a `vision_config` dict; absent fields take transformers' SmolVLMVisionConfig defaults."""
        model_type = hf.get("model_type", "smolvlm_vision")
        if model_type not in VISION_MODEL_TYPES:
            raise ConfigError(f"unknown vision model_type {model_type!r}: smoljax runs "
                              f"{', '.join(VISION_MODEL_TYPES)} encoders")
        defaults = cls()
        fields = {f.name: hf.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
        fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
        fields["model_type"] = model_type
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """SmolVLM2: a SigLIP encoder, a pixel-shuffle connector and a SmolLM2 decoder. Image features replace the
    `<image>` placeholder embeddings in the text; there is no cross-attention."""

    text: LlamaConfig
    vision: VisionConfig = VisionConfig()
    scale_factor: int = 4
    image_token_id: int = 49190
    model_type: str = "smolvlm"

    def __post_init__(self) -> None:
        if not _is_positive_int(self.scale_factor) or self.vision.patches_per_side % self.scale_factor:
            raise ConfigError(f"scale_factor {self.scale_factor!r} must be a positive integer that divides the "
                              f"{self.vision.patches_per_side} patches per side of the vision encoder")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id {self.image_token_id} is outside the vocabulary "
                              f"(0..{self.text.vocab_size - 1})")

    @property
    def image_seq_len(self) -> int:
        """Text positions one image tile fills: its patches after the pixel shuffle (64 for 512 px, 16 px, x4)."""
        return self.vision.num_patches // self.scale_factor ** 2

    @property
    def connector_in_features(self) -> int:
        return self.vision.hidden_size * self.scale_factor ** 2

    def replace(self, **changes: Any) -> "VLMConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "VLMConfig":
        """Builds a config from a SmolVLM2 (`smolvlm`) or Idefics3 (`idefics3`) `config.json` dict."""
        model_type = hf.get("model_type")
        if model_type not in VLM_MODEL_TYPES:
            raise ConfigError(f"unknown model_type {model_type!r}: smoljax runs {', '.join(VLM_MODEL_TYPES)} "
                              "vision-language models (SmolVLM2)")
        unknown = [a for a in hf.get("architectures") or [] if a not in VLM_ARCHITECTURES]
        if unknown:
            raise ConfigError(f"unknown architecture {unknown[0]!r}: smoljax runs {', '.join(VLM_ARCHITECTURES)}")
        text_hf = dict(_require(hf, "text_config"))
        if text_hf.get("use_resampler") or text_hf.get("qk_layer_norms"):
            raise ConfigError("text_config use_resampler/qk_layer_norms are not supported: SmolVLM2 uses neither")
        text_hf.pop("architectures", None)  # SmolVLM2 writes an old training-time class name here
        text_hf.setdefault("model_type", "llama")
        # The head is tied or not at the top level; the text config of the real checkpoints does not say.
        text_hf["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text_hf.get("tie_word_embeddings", False)))
        return cls(text=LlamaConfig.from_hf_dict(text_hf),
                   vision=VisionConfig.from_hf_dict(dict(hf.get("vision_config") or {})),
                   scale_factor=hf.get("scale_factor", 2),
                   image_token_id=_require(hf, "image_token_id"),
                   model_type=model_type)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' SmolVLMForConditionalGeneration loads as this model."""
        text = self.text.to_hf_dict()
        text.pop("architectures")
        architecture = VLM_ARCHITECTURES[VLM_MODEL_TYPES.index(self.model_type)]
        return {
            "architectures": [architecture],
            "model_type": self.model_type,
            "image_token_id": self.image_token_id,
            "scale_factor": self.scale_factor,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "vocab_size": self.text.vocab_size,
            "pad_token_id": self.text.pad_token_id,
            "torch_dtype": self.text.torch_dtype,
            "text_config": text,
            "vision_config": self.vision.to_hf_dict(),
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "VLMConfig":
        return cls.from_hf_dict(read_config_json(path))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")


def config_from_hf_dict(hf: dict[str, Any]) -> "LlamaConfig | VLMConfig":
    """The config class that a `config.json` describes: a SmolVLM2 (`smolvlm`, `idefics3`) or a SmolLM2 (`llama`)."""
    if hf.get("model_type") in VLM_MODEL_TYPES:
        return VLMConfig.from_hf_dict(hf)
    return LlamaConfig.from_hf_dict(hf)


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


# SmolVLM2 (HuggingFaceTB/SmolVLM2-*): config.json values of the hub checkpoints. The text towers are SmolLM2 shapes
# with the 128 added image/utterance tokens (vocab 49280) and untied heads; <end_of_utterance> (49279) ends a turn.
_VLM_TEXT = dict(vocab_size=49280, tie_word_embeddings=False, bos_token_id=1, eos_token_id=49279, pad_token_id=2,
                 initializer_range=0.02)
_SIGLIP_SO400M_384 = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, image_size=384, patch_size=14)

VLM_PRESETS: dict[str, VLMConfig] = {
    "SmolVLM2-256M-Video-Instruct": VLMConfig(text=_SMOLLM2_135M.replace(**_VLM_TEXT)),
    "SmolVLM2-500M-Video-Instruct": VLMConfig(text=_SMOLLM2_360M.replace(**_VLM_TEXT)),
    "SmolVLM2-2.2B-Instruct": VLMConfig(
        text=_SMOLLM2_1_7B.replace(**_VLM_TEXT, rope_theta=273768.0, max_position_embeddings=16384),
        vision=_SIGLIP_SO400M_384, scale_factor=3),
}


def preset(name: str) -> LlamaConfig | VLMConfig:
    """A preset by name, with or without the `HuggingFaceTB/` prefix, e.g. `preset("SmolLM2-360M")` or
    `preset("SmolVLM2-500M-Video-Instruct")`."""
    key = name.split("/")[-1]
    if key in VLM_PRESETS:
        return VLM_PRESETS[key]
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join([*PRESETS, *VLM_PRESETS])}")
    return PRESETS[key]
