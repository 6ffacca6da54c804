"""Training recipes: a YAML file, checked strictly, with `--set key=value` overrides.

    model:      {source: HuggingFaceTB/SmolLM2-135M-Instruct}      # pretrained weights (hub id, HF dir, .gguf)
                {preset: SmolLM2-135M, tokenizer: ..., overrides: {num_hidden_layers: 4}}   # from scratch
    data:       {source: data.jsonl, seq_len: 2048, batch_size: 16, ...}   (smoljax.training.data.DataConfig)
    optimizer:  {learning_rate: 3e-4, warmup_steps: 100, decay: cosine, ...}   (optimizer.OptimizerConfig)
    train:      {compute_dtype: bfloat16, remat: full, accum_steps: 1, ...}    (StepOptions)
    mesh:       {data: 1, fsdp: -1, tensor: 1}
    lora:       {rank: 8, alpha: 16, targets: [q_proj, v_proj]}   # lora.LoraConfig, or null: full fine-tuning
    freeze:     [vision]                                           # top-level parts left untrained
    checkpoint: {every: 500, keep: 3, async_save: true}
    log:        {every: 10, tensorboard: true, progress: true}
    sample:     {every: 200, prompt: "...", max_new_tokens: 32, chat: true}
    out_dir: runs/sft    steps: 1000    seed: 0

Every key is checked: an unknown key, a value of the wrong type or an impossible value stops the run with one line
naming the key. `--set a.b=value` parses `value` as YAML (`--set lora=null`, `--set freeze=[vision]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from smoljax.errors import ConfigError
from smoljax.training.lora import LoraConfig
from smoljax.training.optimizer import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the model comes from: pretrained weights (`source`), or a preset trained from scratch."""

    source: str | None = None
    preset: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.preset is None):
            raise ConfigError("model needs exactly one of source (pretrained weights) or preset (from scratch)")
        if self.source is not None and self.overrides:
            raise ConfigError("model.overrides only applies to a preset trained from scratch; drop it or the source")
        if self.preset is not None and self.tokenizer is None:
            raise ConfigError("a model trained from scratch needs model.tokenizer (a model dir, hub id or .gguf)")


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "builtin:pydoc-text"
    seq_len: int = 2048
    batch_size: int = 16
    format: str = "auto"
    text_key: str = "text"
    messages_key: str = "messages"
    pack: bool = True
    assistant_only_loss: bool = True
    shuffle: bool = True
    max_tiles: int = 0  # SmolVLM2: image tiles per micro-batch (0: rows x 17, room for one full image each)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    attn_impl: str = "auto"
    loss_chunk: int = 2048
    z_loss_weight: float = 0.0
    accum_steps: int = 1
    unroll_layers: bool = False


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class SampleSection:
    every: int = 0  # 0: never
    prompt: str = "What is Python?"
    max_new_tokens: int = 32
    chat: bool = True  # wrap the prompt in the chat template (when the tokenizer has one)


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelSection
    out_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    data: DataSection = DataSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    lora: LoraConfig | None = None
    freeze: tuple[str, ...] = ()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    sample: SampleSection = SampleSection()

    def __post_init__(self) -> None:
        for name in ("steps",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for section, keys in (("data", ("seq_len", "batch_size")), ("checkpoint", ("every", "keep")),
                              ("log", ("every",))):
            for key in keys:
                value = getattr(getattr(self, section), key)
                if value < 1:
                    raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}")
        if self.sample.every < 0 or self.sample.max_new_tokens < 1:
            raise ConfigError("sample.every must be >= 0 and sample.max_new_tokens >= 1")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ---- strict construction from plain data ---------------------------------------------------------------------------


def _type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in typing.get_args(expected))
    if origin is tuple or expected is tuple:
        return "a list"
    if dataclasses.is_dataclass(expected):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        expected, str(expected))


def _convert(value: Any, expected: Any, where: str) -> Any:
    """`value` as type `expected`, or ConfigError naming `where`."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(expected)
        if value is None and type(None) in arguments:
            return None
        errors = []
        for argument in (arg for arg in arguments if arg is not type(None)):
            try:
                return _convert(value, argument, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(expected):
        if value is None and expected is not ModelSection:
            return expected()
        return _build(expected, value, where)
    if origin is tuple or expected is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item_type = typing.get_args(expected)[0] if typing.get_args(expected) else Any
        return tuple(_convert(item, item_type, f"{where}[{index}]") for index, item in enumerate(value))
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
    elif expected is dict:
        if isinstance(value, dict):
            return dict(value)
    elif expected is Any:
        return value
    raise ConfigError(f"{where} must be {_type_name(expected)}, got {value!r}")


def _build(cls: type, mapping: Any, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where or 'the recipe'} must be a mapping of keys to values, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {_join(where, key)!r} in the recipe{hint}")
    values = {key: _convert(value, hints[key], _join(where, key)) for key, value in mapping.items()}
    missing = [name for name, field in fields.items() if name not in values
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"the recipe is missing {_join(where, missing[0])!r}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'the recipe'}: {error}") from None


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def apply_override(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """`raw` with one `--set a.b.c=value` applied (value parsed as YAML); a new dict, `raw` is untouched."""
    if "=" not in assignment:
        raise ConfigError(f"--set takes key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set needs a key before '=', got {assignment!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    updated = dict(raw)
    node = updated
    for part in path[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[path[-1]] = value
    return updated


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; pass a YAML file such as configs/tiny-smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text; pass a YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping (key: value lines)")
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Reads a recipe file, applies `--set` overrides in order, and checks every key and value."""
    raw = read_recipe_file(path)
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """A checked Recipe from plain data (the parsed YAML); raises ConfigError naming the first bad key."""
    return _build(Recipe, raw, "")
