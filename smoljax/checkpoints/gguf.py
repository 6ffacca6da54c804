"""Read llama.cpp GGUF files of LLaMA-architecture models (SmolLM2) as HF-named numpy arrays.

`gguf.GGUFReader` parses the container; the dequantizers below are our own, written from ggml's block layouts.
Every array comes back under its HF transformers name and in HF layout, so the safetensors loader and this
one feed the same params code.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from smoljax.errors import CheckpointError

__all__ = [
    "BLOCK_LAYOUTS",
    "SUPPORTED_ARCHITECTURES",
    "dequantize",
    "gguf_to_hf_config",
    "hf_tensor_name",
    "read_gguf_metadata",
    "read_gguf_tensors",
    "unpermute_rope_rows",
]

SUPPORTED_ARCHITECTURES = ("llama",)

# Keys under "GGUF." describe the file itself, not its key/value metadata (GGUFReader's own convention).
TENSOR_SHAPES_KEY = "GGUF.tensor_shapes"

# What a corrupt or cut-short file makes GGUFReader (or numpy under it) raise.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, OSError)

# Blocks dequantized per step: bounds the temporaries to a few MiB whatever the tensor size.
_BLOCKS_PER_CHUNK = 1 << 15

# --------------------------------------------------------------------------------------------------------------
# Dequantizers. Each maps raw blocks, uint8 [n_blocks, block_bytes], to float32 [n_blocks, block_values].
# Arithmetic follows ggml's reference order (scale products first) so results match it bit for bit.
# --------------------------------------------------------------------------------------------------------------


def _fp16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [n, 2] -> float32 [n, 1]."""
    return raw.view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32]: low nibbles are values 0..15 of a block, high nibbles values 16..31."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _fifth_bits(packed: np.ndarray) -> np.ndarray:
    """Little-endian uint32 bytes [n, 4] -> uint8 [n, 32]: bit i is the fifth bit of value i."""
    return np.unpackbits(packed, axis=1, bitorder="little") << 4


def _dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f4").copy()


def _dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f2").astype(np.float32)


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32.
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    # 34 bytes: fp16 scale, 32 x int8.
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _fp16(blocks[:, :2])


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    # 18 bytes: fp16 scale, 32 x 4-bit values offset by 8.
    values = _nibbles(blocks[:, 2:]).astype(np.int8) - 8
    return _fp16(blocks[:, :2]) * values.astype(np.float32)


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    # 20 bytes: fp16 scale, fp16 minimum, 32 x 4-bit values.
    return _fp16(blocks[:, :2]) * _nibbles(blocks[:, 4:]).astype(np.float32) + _fp16(blocks[:, 2:4])


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    # 22 bytes: fp16 scale, 32 fifth bits, 32 x low nibbles; 5-bit values offset by 16.
    values = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])).astype(np.int8) - 16
    return _fp16(blocks[:, :2]) * values.astype(np.float32)


def _dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    # 24 bytes: fp16 scale, fp16 minimum, 32 fifth bits, 32 x low nibbles.
    values = (_nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])).astype(np.float32)
    return _fp16(blocks[:, :2]) * values + _fp16(blocks[:, 2:4])


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [n, 12] -> 6-bit scales and mins, uint8 [n, 8] each, of the 8 sub-blocks of a Q4_K block.

    Sub-blocks 0-3 sit in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take their low
    4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-3 / 4-7.
    """
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    # 144 bytes: fp16 d, fp16 dmin, 12 bytes of packed scales/mins, 128 bytes = 256 x 4-bit values.
    # Each 32-byte chunk holds two 32-value sub-blocks: low nibbles first, then high nibbles.
    n_blocks = blocks.shape[0]
    scales, mins = _q4_k_scales_and_mins(blocks[:, 4:16])
    sub_scales = (_fp16(blocks[:, 0:2]) * scales.astype(np.float32))[:, :, None]
    sub_offsets = (_fp16(blocks[:, 2:4]) * mins.astype(np.float32))[:, :, None]
    chunks = blocks[:, 16:].reshape(n_blocks, 4, 1, 32)
    values = np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(n_blocks, 8, 32).astype(np.float32)
    return (sub_scales * values - sub_offsets).reshape(n_blocks, 256)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    # 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 x int8 scales, fp16 d.
    # Each 128-value half uses 64 low-nibble bytes (values 0-63 low nibbles, 64-127 high nibbles) and 32 high
    # bytes (bit pairs 0,2,4,6 give values 0-31, 32-63, 64-95, 96-127); values are offset by 32.
    n_blocks = blocks.shape[0]
    low_bytes = blocks[:, :128].reshape(n_blocks, 2, 64)
    low_bits = np.concatenate([low_bytes & 0x0F, low_bytes >> 4], axis=2)
    high_bytes = blocks[:, 128:192].reshape(n_blocks, 2, 1, 32)
    high_bits = (high_bytes >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 0x03
    values = (low_bits | (high_bits.reshape(n_blocks, 2, 128) << 4)).astype(np.int8) - 32
    group_scales = (_fp16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (group_scales * values.reshape(n_blocks, 16, 16).astype(np.float32)).reshape(n_blocks, 256)


_QT = GGMLQuantizationType
# type -> (values per block, bytes per block, dequantizer)
BLOCK_LAYOUTS: dict[GGMLQuantizationType, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    _QT.F32: (1, 4, _dequantize_f32),
    _QT.F16: (1, 2, _dequantize_f16),
    _QT.BF16: (1, 2, _dequantize_bf16),
    _QT.Q8_0: (32, 34, _dequantize_q8_0),
    _QT.Q4_0: (32, 18, _dequantize_q4_0),
    _QT.Q4_1: (32, 20, _dequantize_q4_1),
    _QT.Q5_0: (32, 22, _dequantize_q5_0),
    _QT.Q5_1: (32, 24, _dequantize_q5_1),
    _QT.Q4_K: (256, 144, _dequantize_q4_k),
    _QT.Q6_K: (256, 210, _dequantize_q6_k),
}


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Raw tensor bytes [..., row_bytes] (any dtype, viewed as bytes) -> float32 [..., row_values].

    Same contract as `gguf.quants.dequantize`. Raises KeyError for a type without a dequantizer.
    """
    values_per_block, bytes_per_block, dequantize_blocks = BLOCK_LAYOUTS[ggml_type]
    raw_bytes = np.ascontiguousarray(raw).view(np.uint8)
    blocks = raw_bytes.reshape(-1, bytes_per_block)
    out = np.empty((blocks.shape[0], values_per_block), np.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        stop = start + _BLOCKS_PER_CHUNK
        out[start:stop] = dequantize_blocks(blocks[start:stop])
    return out.reshape(*raw_bytes.shape[:-1], raw_bytes.shape[-1] // bytes_per_block * values_per_block)


# --------------------------------------------------------------------------------------------------------------
# Opening files and reading metadata
# --------------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _corrupt_file_errors(path: Path, errors: tuple[type[Exception], ...] = _PARSE_ERRORS) -> Iterator[None]:
    """Turn what parsing bad bytes raises into one CheckpointError line naming the file."""
    try:
        yield
    except errors as error:
        reason = _one_line(f"{type(error).__name__}: {error}")[:200]
        raise CheckpointError(
            f"{path} is not a readable GGUF file, it is truncated or corrupt ({reason}); re-download or re-export it"
        ) from error


def _open_gguf(path: str | os.PathLike[str]) -> tuple[Path, GGUFReader]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}; check the path (it must be a .gguf file, not a folder)")
    with _corrupt_file_errors(path):
        reader = GGUFReader(path, mode="r")
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF file, which smoljax cannot read; use a little-endian one")
    return path, reader


def _shortest_float32(value: float) -> float:
    # The shortest decimal that round-trips in float32 is what the writer meant: 1e-05, not 9.999999747378752e-06.
    return float(str(np.float32(value)))


def _field_value(field: Any) -> Any:
    value = field.contents()
    if field.types and field.types[-1] == GGUFValueType.FLOAT32:
        return [_shortest_float32(v) for v in value] if isinstance(value, list) else _shortest_float32(value)
    return value


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    # ggml lists dims fastest-first (ne[0] is the row length); numpy order is the reverse.
    return tuple(int(dim) for dim in reversed(tensor.shape.tolist()))


def _tensor_shapes(reader: GGUFReader) -> dict[str, list[int]]:
    return {tensor.name: list(_numpy_shape(tensor)) for tensor in reader.tensors}


def _metadata(path: Path, reader: GGUFReader) -> dict[str, Any]:
    with _corrupt_file_errors(path, (UnicodeDecodeError,)):  # strings are decoded only here
        metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    metadata[TENSOR_SHAPES_KEY] = _tensor_shapes(reader)
    return metadata


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values.

    Strings, ints, floats (float32 values as their shortest decimal), bools and lists of those; token lists are
    list[str]. Besides the file's own keys there are the header entries "GGUF.version", "GGUF.tensor_count",
    "GGUF.kv_count", and "GGUF.tensor_shapes": {gguf tensor name: numpy-order shape, e.g. [49152, 576]}.
    """
    return _metadata(*_open_gguf(path))


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def _required(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise CheckpointError(f"GGUF metadata lacks {key!r}, which a LLaMA model needs; re-export the file")
    return metadata[key]


def _vocab_size(metadata: dict[str, Any], architecture: str) -> int:
    # The embedding's rows are what the weights need; the token list covers files read without tensor shapes.
    embedding_shape = metadata.get(TENSOR_SHAPES_KEY, {}).get("token_embd.weight")
    if embedding_shape is not None:
        return int(embedding_shape[0])
    if "tokenizer.ggml.tokens" in metadata:
        return len(metadata["tokenizer.ggml.tokens"])
    return int(_required(metadata, f"{architecture}.vocab_size"))


def gguf_to_hf_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """HF `config.json`-style dict of a LlamaForCausalLM, from `read_gguf_metadata` output."""
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {architecture!r} is not supported; smoljax reads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensor_shapes = metadata.get(TENSOR_SHAPES_KEY, {})
    # Llama 3.1-style files carry a rope_freqs tensor; others name a scaling type. HF needs rope_scaling for both.
    if metadata.get(f"{architecture}.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_shapes:
        raise CheckpointError("GGUF model uses RoPE scaling, which smoljax does not support; use a model without it")
    hidden_size = int(_required(metadata, f"{architecture}.embedding_length"))
    num_heads = int(_required(metadata, f"{architecture}.attention.head_count"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _vocab_size(metadata, architecture),
        "hidden_size": hidden_size,
        "intermediate_size": int(_required(metadata, f"{architecture}.feed_forward_length")),
        "num_hidden_layers": int(_required(metadata, f"{architecture}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(metadata.get(f"{architecture}.attention.head_count_kv", num_heads)),
        "head_dim": int(metadata.get(f"{architecture}.attention.key_length", hidden_size // max(num_heads, 1))),
        "rms_norm_eps": float(_required(metadata, f"{architecture}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(metadata.get(f"{architecture}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_required(metadata, f"{architecture}.context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    _check_consistent(config, tensor_shapes)
    return config


def _check_consistent(config: dict[str, Any], tensor_shapes: dict[str, list[int]]) -> None:
    """Reject metadata that no LLaMA model has: a corrupt file must not make us build millions of layers."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        if config[key] <= 0:
            _inconsistent(f"{key} is {config[key]}")
    if config["head_dim"] % 2:
        _inconsistent(f"head_dim {config['head_dim']} is odd, so RoPE cannot pair its dims")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        _inconsistent(f"{config['num_attention_heads']} heads do not group into {config['num_key_value_heads']}")
    layers_in_file = {name.split(".")[1] for name in tensor_shapes if name.startswith("blk.")}
    if tensor_shapes and len(layers_in_file) != config["num_hidden_layers"]:
        _inconsistent(f"it says {config['num_hidden_layers']} layers but has tensors for {len(layers_in_file)}")


def _inconsistent(problem: str) -> NoReturn:
    raise CheckpointError(f"GGUF metadata is inconsistent: {problem}; re-download or re-export the file")


# --------------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------------

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF transformers name of a llama.cpp tensor name, or None when it has none."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{int(match[1])}.{_LAYER_NAMES[match[2]]}.weight"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation: [out, in] -> [out, in].

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... so its converter reorders each head's rows from
    HF's half split [a0 .. a31 | b0 .. b31] (head_dim 64) to pairs [a0, b0, a1, b1, ...]; this restores the split.
    """
    rows, cols = weight.shape
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
    return pairs.swapaxes(1, 2).reshape(rows, cols)


def _check_dequantizable(path: Path, tensor: Any) -> None:
    if tensor.tensor_type not in BLOCK_LAYOUTS:
        supported = ", ".join(t.name for t in BLOCK_LAYOUTS)
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which smoljax cannot dequantize; "
            f"use a GGUF quantized as one of {supported}"
        )


def read_gguf_tensors(path: str | os.PathLike[str], dtype: npt.DTypeLike = np.float32) -> dict[str, np.ndarray]:
    """Every tensor of a LLaMA GGUF file, dequantized, under its HF name and in HF layout (see `read_gguf`)."""
    return read_gguf(path, dtype)[1]


def read_gguf(path: str | os.PathLike[str], dtype: npt.DTypeLike = np.float32,
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata (as `read_gguf_metadata`) and every tensor, parsing the file once.

    Tensor shapes: model.embed_tokens.weight / lm_head.weight [vocab, hidden]; projections [out, in] (q_proj
    [heads * head_dim, hidden], k_proj/v_proj [kv_heads * head_dim, hidden], down_proj [hidden, intermediate]);
    norms [hidden]. q_proj/k_proj rows are in HF's half-split RoPE order. lm_head is absent when tied.
    """
    from smoljax.checkpoints.hf_layout import expected_hf_shapes
    from smoljax.config import LlamaConfig

    path, reader = _open_gguf(path)
    metadata = _metadata(path, reader)
    try:
        config = gguf_to_hf_config(metadata)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    expected_shapes = expected_hf_shapes(LlamaConfig.from_hf_dict(config))
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name not in expected_shapes:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} does not belong to a {config['num_hidden_layers']}-layer LLaMA "
                "model; smoljax reads only LLaMA-architecture GGUF files"
            )
        _check_dequantizable(path, tensor)
        if _numpy_shape(tensor) != expected_shapes[name]:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has shape {list(_numpy_shape(tensor))} but the file's metadata "
                f"implies {list(expected_shapes[name])}; the file is inconsistent, re-export it"
            )
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(expected_shapes[name])
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        tensors[name] = weight.astype(dtype, copy=False)
    missing = sorted(set(expected_shapes) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors (first: {missing[0]}); re-download or re-export it")
    return metadata, tensors
