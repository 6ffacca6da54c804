"""Read and write safetensors checkpoints as HF tensor names -> numpy arrays.

The format is an 8-byte little-endian header length, a JSON header (`name -> {dtype, shape, data_offsets}` plus an
optional `__metadata__`), then the raw little-endian tensor bytes. Parsing it here, rather than through
`safetensors.numpy`, lets every failure name the file and tensor and say what to do.

Sharded checkpoints follow transformers: `model-00001-of-00003.safetensors` plus `model.safetensors.index.json`
(`{"metadata": {"total_size": ...}, "weight_map": {name: shard file}}`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from smoljax.errors import CheckpointError

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
SHARD_NAME_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the reference `safetensors` implementation enforces
_REDOWNLOAD_HINT = "re-download or re-save the checkpoint"

# safetensors dtype tag <-> numpy dtype (explicitly little-endian, as the format is).
_NUMPY_DTYPE_BY_TAG: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_TAG_BY_NUMPY_DTYPE: dict[np.dtype, str] = {dtype: tag for tag, dtype in _NUMPY_DTYPE_BY_TAG.items()}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


class _TensorEntry(NamedTuple):
    """One tensor's header entry, validated: its bytes lie at [begin, end) of the data section."""

    name: str
    dtype_tag: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _parse_entry(path: Path, name: str, raw: Any) -> _TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} has a corrupt header entry; {_REDOWNLOAD_HINT}")
    dtype_tag, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    shape_ok = isinstance(shape, list) and all(isinstance(dim, int) and dim >= 0 for dim in shape)
    offsets_ok = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(offset, int) for offset in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )
    if not isinstance(dtype_tag, str) or not shape_ok or not offsets_ok:
        raise CheckpointError(f"{where} has a corrupt header entry {raw!r}; {_REDOWNLOAD_HINT}")
    return _TensorEntry(name, dtype_tag, tuple(shape), offsets[0], offsets[1])


def _read_header(path: Path, file: BinaryIO) -> tuple[dict[str, _TensorEntry], int]:
    """Parse and validate the header; return the entries and the file offset where tensor data starts."""
    file_size = os.fstat(file.fileno()).st_size
    length_bytes = file.read(_HEADER_LENGTH_BYTES)
    if len(length_bytes) < _HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{path} is only {file_size} bytes, too short for a safetensors file; {_REDOWNLOAD_HINT}")
    header_length = int.from_bytes(length_bytes, "little")
    if header_length > min(_MAX_HEADER_BYTES, file_size - _HEADER_LENGTH_BYTES):
        raise CheckpointError(
            f"{path} has a corrupt header: it claims {header_length} header bytes in a {file_size}-byte file "
            f"(truncated, or not a safetensors file); {_REDOWNLOAD_HINT}"
        )
    try:
        header = json.loads(file.read(header_length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} has a corrupt header (invalid JSON: {error}); {_REDOWNLOAD_HINT}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header (not a JSON object); {_REDOWNLOAD_HINT}")
    header.pop("__metadata__", None)
    entries = {name: _parse_entry(path, name, raw) for name, raw in header.items()}
    data_start = _HEADER_LENGTH_BYTES + header_length
    data_end = max((entry.end for entry in entries.values()), default=0)
    if data_start + data_end > file_size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {data_start + data_end} bytes but the file has {file_size}; "
            f"{_REDOWNLOAD_HINT}"
        )
    return entries, data_start


def _entry_numpy_dtype(path: Path, entry: _TensorEntry) -> np.dtype:
    dtype = _NUMPY_DTYPE_BY_TAG.get(entry.dtype_tag)
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r} has dtype {entry.dtype_tag}, which smoljax cannot read "
            f"(supported: {', '.join(_NUMPY_DTYPE_BY_TAG)}); convert the checkpoint to bf16 or f32"
        )
    expected_bytes = math.prod(entry.shape) * dtype.itemsize
    if entry.end - entry.begin != expected_bytes:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r} holds {entry.end - entry.begin} bytes but shape {list(entry.shape)} "
            f"of {entry.dtype_tag} needs {expected_bytes}; {_REDOWNLOAD_HINT}"
        )
    return dtype


def _read_entry(path: Path, file: BinaryIO, data_start: int, entry: _TensorEntry) -> np.ndarray:
    # Read into a fresh array rather than a memmap, so the result does not pin the file (which a later save replaces).
    array = np.empty(entry.shape, dtype=_entry_numpy_dtype(path, entry))
    file.seek(data_start + entry.begin)
    if file.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
        raise CheckpointError(f"{path}: tensor {entry.name!r} is cut short; {_REDOWNLOAD_HINT}")
    return array


def _read_file(
    path: Path, names: Iterable[str] | None, dtype: np.dtype | None, index_path: Path | None = None
) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as file:
            entries, data_start = _read_header(path, file)
            wanted = entries if names is None else names
            arrays = {}
            for name in wanted:
                if name not in entries:
                    if index_path is None:
                        raise CheckpointError(f"{path} has no tensor {name!r}; check the tensor name or the checkpoint")
                    raise CheckpointError(
                        f"{path} has no tensor {name!r} although {index_path.name} places it there; "
                        "re-download the checkpoint, its index and shards disagree"
                    )
                array = _read_entry(path, file, data_start, entries[name])
                arrays[name] = array if dtype is None else array.astype(dtype, copy=False)
            return arrays
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; pass a directory that holds a safetensors checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, expected a .safetensors file") from None


def _read_index(index_path: Path) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name."""
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{index_path} does not exist; pass a directory that holds a checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not valid JSON ({error}); {_REDOWNLOAD_HINT}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(f"{index_path} has no valid 'weight_map' (tensor name -> shard file); {_REDOWNLOAD_HINT}")
    return weight_map


def _locate_checkpoint(path_or_dir: str | os.PathLike) -> Path:
    """The single .safetensors file or the index file to read, following transformers' preference order."""
    path = Path(path_or_dir)
    if path.is_dir():
        for candidate in (path / SINGLE_FILE_NAME, path / INDEX_FILE_NAME):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path} holds neither {SINGLE_FILE_NAME} nor {INDEX_FILE_NAME}; pass a directory saved by "
            "transformers or smoljax"
        )
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a safetensors file or a checkpoint directory")
    return path


def read_safetensors(
    path_or_dir: str | os.PathLike, *, names: Iterable[str] | None = None, dtype: Any = None
) -> dict[str, np.ndarray]:
    """Load tensors from a `.safetensors` file, an index file, or a directory holding either.

    `names` restricts loading to those tensors (each must exist); `dtype` casts every array (e.g. np.float32,
    "bfloat16"). bf16 tensors come back as `ml_dtypes.bfloat16` arrays, which jax accepts directly.
    """
    target_dtype = None if dtype is None else np.dtype(dtype)
    location = _locate_checkpoint(path_or_dir)
    if not location.name.endswith(".index.json"):
        return _read_file(location, names, target_dtype)

    weight_map = _read_index(location)
    wanted = list(weight_map) if names is None else list(names)
    unknown = [name for name in wanted if name not in weight_map]
    if unknown:
        raise CheckpointError(f"{location} has no tensor {unknown[0]!r}; check that the checkpoint is complete")
    names_by_shard: dict[str, list[str]] = {}
    for name in wanted:
        names_by_shard.setdefault(weight_map[name], []).append(name)
    arrays: dict[str, np.ndarray] = {}
    for shard_name, shard_tensor_names in names_by_shard.items():
        shard_path = location.parent / shard_name
        if not shard_path.is_file():
            raise CheckpointError(
                f"{shard_path} is missing but {location.name} names it; download the missing shard again"
            )
        arrays.update(_read_file(shard_path, shard_tensor_names, target_dtype, index_path=location))
    return {name: arrays[name] for name in wanted}


def read_tensor_shapes(path_or_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, read from the headers only (no tensor data is loaded)."""
    location = _locate_checkpoint(path_or_dir)
    files = [location]
    if location.name.endswith(".index.json"):
        files = [location.parent / shard for shard in dict.fromkeys(_read_index(location).values())]
    shapes: dict[str, tuple[int, ...]] = {}
    for file_path in files:
        try:
            with open(file_path, "rb") as file:
                entries, _ = _read_header(file_path, file)
        except FileNotFoundError:
            raise CheckpointError(f"{file_path} is missing; download the missing shard again") from None
        shapes.update({name: entry.shape for name, entry in entries.items()})
    return shapes


def check_tensor_names(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise CheckpointError for the first missing tensor, unexpected tensor or shape mismatch (name -> shape maps)."""
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source} is missing tensor {missing[0]!r}{more}; check that the checkpoint matches the model config "
            "or pass the right checkpoint"
        )
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source} has unexpected tensor {unexpected[0]!r}{more}; it is probably a different architecture, "
            "pass a SmolLM2/SmolVLM2 checkpoint"
        )
    for name, expected_shape in expected.items():
        if tuple(found[name]) != tuple(expected_shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(found[name])}, expected {tuple(expected_shape)}; "
                "check that config.json matches the weights"
            )


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _as_little_endian(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _TAG_BY_NUMPY_DTYPE:
        raise CheckpointError(
            f"cannot save tensor {name!r} of dtype {array.dtype}: safetensors supports "
            f"{', '.join(str(dtype) for dtype in _TAG_BY_NUMPY_DTYPE)}; cast it first"
        )
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return array if array.flags.c_contiguous else array.copy(order="C")


def _encode_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) and the order in which tensor data follows it."""
    # Larger itemsizes first, and a header padded to 8 bytes, keep every tensor aligned for memory-mapping readers.
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        array = tensors[name]
        header[name] = {
            "dtype": _TAG_BY_NUMPY_DTYPE[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header_json = json.dumps(header, separators=(",", ":")).encode()
    header_json += b" " * (-len(header_json) % 8)
    return len(header_json).to_bytes(_HEADER_LENGTH_BYTES, "little") + header_json, order


def _write_tensor_bytes(file: BinaryIO, array: np.ndarray) -> None:
    file.write(array.reshape(-1).view(np.uint8).data)


def _write_temp_file(directory: Path, final_name: str, write: Any) -> Path:
    """Write via `write(file)` into a hidden temp file beside `final_name`; removed again if writing fails."""
    handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".tmp")
    temp_path = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path


def _write_safetensors_temp(
    directory: Path, final_name: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> Path:
    header_bytes, order = _encode_header(tensors, metadata)

    def write(file: BinaryIO) -> None:
        file.write(header_bytes)
        for name in order:
            _write_tensor_bytes(file, tensors[name])

    return _write_temp_file(directory, final_name, write)


def _split_into_shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy in key order, as transformers does: a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = 0
    for name, array in tensors.items():
        if array.nbytes > max_shard_bytes:
            shards.append({name: array})
            continue
        if current and current_bytes + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = array
        current_bytes += array.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _is_checkpoint_file(name: str) -> bool:
    return name in (SINGLE_FILE_NAME, INDEX_FILE_NAME) or SHARD_NAME_PATTERN.fullmatch(name) is not None


def write_safetensors(
    directory: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = {"format": "pt"},  # noqa: B006 - read only; "pt" is what HF loaders expect
) -> list[Path]:
    """Save tensors as `model.safetensors`, or as transformers-named shards plus an index past `max_shard_bytes`.

    Every file is written to a temp file and then renamed into place, so an interrupted save leaves any existing
    checkpoint in `directory` intact; checkpoint files of a previous save that this one does not rewrite are removed
    only once the new ones are complete. Other files in `directory` (config.json, tokenizer) are left alone.
    Returns the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: _as_little_endian(name, value) for name, value in tensors.items()}
    shards = [arrays] if max_shard_bytes is None else _split_into_shards(arrays, max_shard_bytes)

    if len(shards) == 1:
        final_names = [SINGLE_FILE_NAME]
    else:
        final_names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    temp_paths: list[Path] = []
    try:
        for final_name, shard in zip(final_names, shards):
            temp_paths.append(_write_safetensors_temp(directory, final_name, shard, metadata))
        if len(shards) > 1:
            total_bytes = sum(array.nbytes for array in arrays.values())
            index = {
                "metadata": {"total_parameters": sum(a.size for a in arrays.values()), "total_size": total_bytes},
                "weight_map": {name: final_names[i] for i, shard in enumerate(shards) for name in sorted(shard)},
            }
            index_bytes = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            final_names.append(INDEX_FILE_NAME)
            temp_paths.append(_write_temp_file(directory, INDEX_FILE_NAME, lambda file: file.write(index_bytes)))
    except BaseException:
        for temp_path in temp_paths:
            temp_path.unlink(missing_ok=True)
        raise

    # All bytes are on disk: rename into place, the index last so it never names a shard that is not there yet.
    written = []
    for temp_path, final_name in zip(temp_paths, final_names):
        os.replace(temp_path, directory / final_name)
        written.append(directory / final_name)
    for stale in directory.iterdir():
        if _is_checkpoint_file(stale.name) and stale.name not in final_names:
            stale.unlink()
    return written
