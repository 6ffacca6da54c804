"""safetensors reading and writing: round trips, interoperability with the reference `safetensors` package and with
huggingface_hub's shard layout, one-line errors for broken files, and saves that never corrupt an existing checkpoint.

Comparisons are bitwise (no tolerance): storing and loading must not change a single bit.
"""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from smoljax.checkpoints import safetensors_io
from smoljax.checkpoints.safetensors_io import (
    check_tensor_names,
    read_safetensors,
    read_tensor_shapes,
    write_safetensors,
)
from smoljax.errors import CheckpointError

DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16}


def make_tensors(dtype, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (64, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.mlp.up_proj.weight": (32, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.norm.weight": (16,),
        "scalar": (),
    }
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        got = np.asarray(actual[name])
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A hand-made safetensors file, for headers our writer would never produce."""
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "errors must be one line"
    return message


# --- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_single_file_round_trip(tmp_path, dtype_name):
    tensors = make_tensors(DTYPES[dtype_name])
    written = write_safetensors(tmp_path, tensors)
    assert written == [tmp_path / "model.safetensors"]
    assert_bitwise_equal(read_safetensors(tmp_path), tensors)
    assert_bitwise_equal(read_safetensors(tmp_path / "model.safetensors"), tensors)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_sharded_round_trip(tmp_path, dtype_name):
    tensors = make_tensors(DTYPES[dtype_name])
    max_shard_bytes = 1200 * np.dtype(DTYPES[dtype_name]).itemsize // 4
    written = write_safetensors(tmp_path, tensors, max_shard_bytes=max_shard_bytes)

    shard_count = len(written) - 1
    assert shard_count > 1
    assert [path.name for path in written] == [
        *(f"model-{i:05d}-of-{shard_count:05d}.safetensors" for i in range(1, shard_count + 1)),
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(array.nbytes for array in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for shard_path in written[:-1]:
        shard = read_safetensors(shard_path)
        assert sum(array.nbytes for array in shard.values()) <= max_shard_bytes or len(shard) == 1
    assert_bitwise_equal(read_safetensors(tmp_path), tensors)
    assert not (tmp_path / "model.safetensors").exists()


def test_shard_names_and_index_match_huggingface_hub(tmp_path):
    torch = pytest.importorskip("torch")
    from huggingface_hub import save_torch_state_dict

    tensors = make_tensors(np.float32)
    max_shard_bytes = 2500
    ours = write_safetensors(tmp_path / "ours", tensors, max_shard_bytes=max_shard_bytes)
    assert len(ours) > 2, "the comparison needs several shards"
    (tmp_path / "reference").mkdir()
    save_torch_state_dict(
        {name: torch.from_numpy(array.copy()) for name, array in tensors.items()},
        tmp_path / "reference",
        max_shard_size=max_shard_bytes,
    )
    reference_names = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert sorted(path.name for path in ours) == reference_names
    our_index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    reference_index = json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())
    assert our_index["weight_map"] == reference_index["weight_map"]
    assert our_index["metadata"]["total_size"] == reference_index["metadata"]["total_size"]
    assert_bitwise_equal(read_safetensors(tmp_path / "reference"), tensors)


def test_dtype_cast_and_name_selection(tmp_path):
    tensors = make_tensors(ml_dtypes.bfloat16)
    write_safetensors(tmp_path, tensors, max_shard_bytes=600)
    wanted = ["model.norm.weight", "model.embed_tokens.weight"]
    loaded = read_safetensors(tmp_path, names=wanted, dtype=np.float32)
    assert list(loaded) == wanted
    assert_bitwise_equal(loaded, {name: tensors[name].astype(np.float32) for name in wanted})
    assert read_safetensors(tmp_path, names=["scalar"], dtype="bfloat16")["scalar"].dtype == ml_dtypes.bfloat16


def test_read_tensor_shapes_reads_headers_of_single_and_sharded(tmp_path):
    tensors = make_tensors(np.float16)
    write_safetensors(tmp_path / "single", tensors)
    write_safetensors(tmp_path / "sharded", tensors, max_shard_bytes=600)
    expected = {name: array.shape for name, array in tensors.items()}
    assert read_tensor_shapes(tmp_path / "single") == expected
    assert read_tensor_shapes(tmp_path / "sharded") == expected


def test_jax_arrays_are_written_with_their_dtype(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    tensors = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "b": jnp.ones(3, jnp.float32)}
    write_safetensors(tmp_path, tensors)
    assert_bitwise_equal(read_safetensors(tmp_path), {name: np.asarray(array) for name, array in tensors.items()})


# --- interoperability with the reference implementation ------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_reference_loaders_read_our_files(tmp_path, dtype_name):
    import safetensors.numpy

    torch = pytest.importorskip("torch")
    import safetensors.torch

    tensors = make_tensors(DTYPES[dtype_name])
    write_safetensors(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    assert_bitwise_equal(safetensors.numpy.load_file(path), tensors)

    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]
    loaded = safetensors.torch.load_file(path)
    for name, array in tensors.items():
        assert loaded[name].dtype == torch_dtype
        assert tuple(loaded[name].shape) == array.shape
        # Compare raw bits: numpy has no bf16 view of a torch tensor, so go through a same-width integer.
        bits = loaded[name].view(torch.int16 if array.itemsize == 2 else torch.int32).numpy()
        assert bits.tobytes() == array.tobytes(), name
    with safetensors.safe_open(path, "np") as file:
        assert file.metadata() == {"format": "pt"}


def test_we_read_files_written_by_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    generator = torch.Generator().manual_seed(0)
    reference = {
        "bf16": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(3, generator=generator).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=generator),
        "scalar": torch.tensor(1.5),
    }
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference, path, metadata={"format": "pt"})
    loaded = read_safetensors(path)

    assert loaded["bf16"].dtype == ml_dtypes.bfloat16
    assert loaded["f16"].dtype == np.float16 and loaded["f32"].dtype == np.float32
    for name, tensor in reference.items():
        assert loaded[name].shape == tuple(tensor.shape)
        bits = tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32).numpy()
        assert loaded[name].tobytes() == bits.tobytes(), name


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in error_message(excinfo)
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(tmp_path)
    assert str(tmp_path) in error_message(excinfo) and "model.safetensors" in error_message(excinfo)


def test_missing_shard_named_by_index(tmp_path):
    written = write_safetensors(tmp_path, make_tensors(np.float32), max_shard_bytes=600)
    written[1].unlink()
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(tmp_path)
    assert written[1].name in error_message(excinfo) and "model.safetensors.index.json" in error_message(excinfo)
    with pytest.raises(CheckpointError, match=written[1].name):
        read_tensor_shapes(tmp_path)


def test_index_names_tensor_missing_from_its_shard(tmp_path):
    written = write_safetensors(tmp_path, make_tensors(np.float32), max_shard_bytes=600)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = written[0].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(tmp_path)
    message = error_message(excinfo)
    assert written[0].name in message and "model.layers.9.ghost.weight" in message


def test_invalid_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(tmp_path)
    assert "model.safetensors.index.json" in error_message(excinfo)


def test_truncated_file(tmp_path):
    write_safetensors(tmp_path, make_tensors(np.float32))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(path)
    assert "model.safetensors" in error_message(excinfo) and "truncated" in error_message(excinfo)


@pytest.mark.parametrize(
    "raw_bytes",
    [
        b"\x01\x02",  # shorter than the 8-byte length
        struct.pack("<Q", 1 << 40) + b"{}",  # header length past the end of the file
        struct.pack("<Q", 9) + b"{not json",
        struct.pack("<Q", 2) + b"[]",  # valid JSON, but not an object
    ],
    ids=["too-short", "bad-length", "invalid-json", "not-an-object"],
)
def test_corrupt_header(tmp_path, raw_bytes):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(raw_bytes)
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(path)
    assert "broken.safetensors" in error_message(excinfo)


def test_tensor_size_disagrees_with_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(20))
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(path)
    message = error_message(excinfo)
    assert "model.safetensors" in message and "'w'" in message and "24" in message


def test_unsupported_dtype(tmp_path):
    header = {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(4))
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(path)
    message = error_message(excinfo)
    assert "model.safetensors" in message and "'w'" in message and "F8_E4M3" in message


def test_malformed_tensor_entry(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(8))
    with pytest.raises(CheckpointError, match="'w'"):
        read_safetensors(path)


def test_requested_name_absent(tmp_path):
    write_safetensors(tmp_path, make_tensors(np.float32))
    with pytest.raises(CheckpointError) as excinfo:
        read_safetensors(tmp_path, names=["lm_head.weight"])
    assert "lm_head.weight" in error_message(excinfo) and "model.safetensors" in error_message(excinfo)


def test_unsupported_dtype_on_write(tmp_path):
    with pytest.raises(CheckpointError, match="'z'"):
        write_safetensors(tmp_path, {"z": np.zeros(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []


# --- saves never corrupt what was there ------------------------------------------------------------------------------


@pytest.mark.parametrize("previous_shard_bytes", [None, 600], ids=["previous-single", "previous-sharded"])
@pytest.mark.parametrize("new_shard_bytes", [None, 600], ids=["new-single", "new-sharded"])
def test_interrupted_save_leaves_previous_checkpoint_intact(
    tmp_path, monkeypatch, previous_shard_bytes, new_shard_bytes
):
    previous = make_tensors(np.float32, seed=1)
    write_safetensors(tmp_path, previous, max_shard_bytes=previous_shard_bytes)
    (tmp_path / "config.json").write_text("{}")
    files_before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    calls = {"count": 0}
    real_write = safetensors_io._write_tensor_bytes

    def write_then_fail(file, array):
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        real_write(file, array)

    monkeypatch.setattr(safetensors_io, "_write_tensor_bytes", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path, make_tensors(np.float32, seed=2), max_shard_bytes=new_shard_bytes)

    assert calls["count"] == 4, "the interruption must happen mid-save"
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files_before  # no temp files left
    assert_bitwise_equal(read_safetensors(tmp_path), previous)


def test_resave_replaces_stale_files_and_keeps_others(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes-00001-of-00002.safetensors").write_bytes(b"not ours")
    write_safetensors(tmp_path, make_tensors(np.float32, seed=1), max_shard_bytes=600)

    single = make_tensors(np.float32, seed=2)
    write_safetensors(tmp_path, single)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes-00001-of-00002.safetensors",
    ]
    assert_bitwise_equal(read_safetensors(tmp_path), single)

    sharded = make_tensors(np.float16, seed=3)
    written = write_safetensors(tmp_path, sharded, max_shard_bytes=600)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["config.json", "notes-00001-of-00002.safetensors", *(path.name for path in written)]
    )
    assert_bitwise_equal(read_safetensors(tmp_path), sharded)


# --- name and shape checks -----------------------------------------------------------------------------------------

EXPECTED_SHAPES = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,)}


def test_check_tensor_names_accepts_a_match():
    check_tensor_names(dict(EXPECTED_SHAPES), EXPECTED_SHAPES, "ckpt")


@pytest.mark.parametrize(
    "found, expected_fragments",
    [
        ({"model.embed_tokens.weight": (64, 16)}, ["missing", "'model.norm.weight'"]),
        ({**EXPECTED_SHAPES, "model.extra.weight": (1,)}, ["unexpected", "'model.extra.weight'"]),
        ({**EXPECTED_SHAPES, "model.norm.weight": [32]}, ["'model.norm.weight'", "(32,)", "(16,)"]),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_check_tensor_names_reports_first_problem(found, expected_fragments):
    with pytest.raises(CheckpointError) as excinfo:
        check_tensor_names(found, EXPECTED_SHAPES, "/models/smol")
    message = error_message(excinfo)
    assert "/models/smol" in message
    for fragment in expected_fragments:
        assert fragment in message
