"""smoljax.checkpoints.gguf against gguf-py's dequantizers, llama.cpp's q/k permutation and transformers' loader."""

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from smoljax.checkpoints import gguf as gguf_io
from smoljax.errors import CheckpointError

TESTED_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q6_K]
# Byte offsets of each block's fp16 scale/min fields; random bytes there could be inf/NaN, which real files lack.
FP16_FIELDS = {
    QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q4_K: [0, 2], QT.Q6_K: [208],
}
QUANTIZABLE = [QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]  # gguf.quants.quantize supports these


def random_raw_rows(ggml_type: QT, rng: np.random.Generator, rows: int = 3, blocks_per_row: int = 5) -> np.ndarray:
    """Random raw tensor bytes [rows, blocks_per_row * bytes_per_block] with finite fp16 scales."""
    _, bytes_per_block = gguf.GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows * blocks_per_row, bytes_per_block), dtype=np.uint8)
    for offset in FP16_FIELDS.get(ggml_type, []):
        bits = rng.integers(0, 1 << 16, rows * blocks_per_row, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # all-ones exponent (inf/NaN) -> finite, keeps subnormals and zeros
        blocks[:, offset:offset + 2] = bits.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def assert_same_bits(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.dtype == reference.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))  # 0 ulp, signed zeros and NaNs too


# ---------------------------------------------------------------------------------------------------------------
# Dequantizers, bit for bit against gguf-py
# ---------------------------------------------------------------------------------------------------------------


def test_every_dequantizer_is_tested():
    assert set(gguf_io.BLOCK_LAYOUTS) == set(TESTED_TYPES)


@pytest.mark.parametrize("ggml_type", TESTED_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf_py(ggml_type, monkeypatch):
    monkeypatch.setattr(gguf_io, "_BLOCKS_PER_CHUNK", 4)  # several chunks, the last one partial
    raw = random_raw_rows(ggml_type, np.random.default_rng(int(ggml_type)))
    assert_same_bits(gguf_io.dequantize(raw, ggml_type), gguf.quants.dequantize(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_quantized_floats_matches_gguf_py(ggml_type):
    values = np.random.default_rng(0).uniform(-1, 1, (4, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, ggml_type)
    ours = gguf_io.dequantize(raw, ggml_type)
    assert_same_bits(ours, gguf.quants.dequantize(raw, ggml_type))
    # Q4_0's worst case is 1/8 of the block's max (its positive side clips at 7/8); a scrambled order errs by ~1.
    np.testing.assert_allclose(ours, values, atol=0.13)


def test_dequantize_hand_built_blocks():
    # Independent of gguf-py: Q8_0 and Q4_1 are the real file's quantized types.
    q8_scale = np.array([0.5], np.float16).view(np.uint8)
    q8_block = np.concatenate([q8_scale, np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    np.testing.assert_array_equal(gguf_io.dequantize(q8_block[None], QT.Q8_0)[0], np.arange(-16, 16) * 0.5)
    nibbles = np.arange(32) % 16
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    q4_1_block = np.concatenate([np.array([2.0, -1.0], np.float16).view(np.uint8), packed])
    np.testing.assert_array_equal(gguf_io.dequantize(q4_1_block[None], QT.Q4_1)[0], nibbles * 2.0 - 1.0)


# ---------------------------------------------------------------------------------------------------------------
# A tiny synthetic LLaMA GGUF, written the way llama.cpp's converter writes one
# ---------------------------------------------------------------------------------------------------------------

TINY = {"vocab": 32, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 96, "layers": 2}
HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute: HF half-split rows -> llama.cpp's interleaved-pair rows."""
    halves = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def tiny_hf_weights(tied: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    hidden, mlp = TINY["hidden"], TINY["mlp"]
    q_rows, kv_rows = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
    layer_shapes = {
        "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
    }
    weights = {"model.embed_tokens.weight": (TINY["vocab"], hidden), "model.norm.weight": (hidden,)}
    if not tied:
        weights["lm_head.weight"] = (TINY["vocab"], hidden)
    for layer in range(TINY["layers"]):
        weights.update({f"model.layers.{layer}.{name}.weight": shape for name, shape in layer_shapes.items()})
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in weights.items()}


def gguf_name(hf_name: str) -> str:
    top_level = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top_level:
        return top_level[hf_name]
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[module]}.weight"


def write_tiny_gguf(path, hf_weights, architecture="llama", extra_tensors=(), endianess=gguf.GGUFEndian.LITTLE):
    writer = gguf.GGUFWriter(str(path), architecture, endianess=endianess)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["mlp"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(5e5)
    writer.add_token_list([f"tok{i}" for i in range(TINY["vocab"])])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    for name, weight in hf_weights.items():
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, TINY["kv_heads"])
        writer.add_tensor(gguf_name(name), weight)
    for name, weight, raw_dtype in extra_tensors:
        writer.add_tensor(name, weight, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_untied_gguf_round_trips_to_hf_layout(tmp_path):
    hf_weights = tiny_hf_weights(tied=False)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_weights)
    tensors = gguf_io.read_gguf_tensors(path)
    assert tensors.keys() == hf_weights.keys()
    for name, weight in hf_weights.items():
        np.testing.assert_array_equal(tensors[name], weight, err_msg=name)
    config = gguf_io.gguf_to_hf_config(gguf_io.read_gguf_metadata(path))
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (5e5, 1e-6)
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, 4)
    assert config["pad_token_id"] is None


def test_read_gguf_tensors_casts_to_dtype(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(tied=True))
    tensors = gguf_io.read_gguf_tensors(path, dtype=np.float16)
    assert "lm_head.weight" not in tensors
    assert {weight.dtype for weight in tensors.values()} == {np.dtype(np.float16)}


def rope_scores(q, k, pair_index: np.ndarray, partner: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """q, k [T, heads, head_dim] -> per-head scores [heads, T, T] after a RoPE that rotates coordinate i with
    coordinate `partner[i]` at the frequency of pair `pair_index[i]`."""
    positions = np.arange(q.shape[0])[:, None, None]
    angles = positions * 10000.0 ** (-2 * pair_index / q.shape[-1])
    rotate = lambda x: x * np.cos(angles) + sign * x[..., partner] * np.sin(angles)  # noqa: E731
    return np.einsum("thd,shd->hts", rotate(q), rotate(k))


def test_unpermuted_weights_under_hf_rope_give_llama_cpp_scores():
    # Why the permutation exists: the file's rows under llama.cpp's interleaved RoPE must give the same attention
    # scores as our unpermuted rows under HF's half-split RoPE.
    rng = np.random.default_rng(2)
    heads, head_dim, hidden = 3, 8, 24
    file_q, file_k = (rng.standard_normal((heads * head_dim, hidden)) for _ in range(2))
    x = rng.standard_normal((5, hidden))
    half = head_dim // 2
    index = np.arange(head_dim)
    interleaved = dict(pair_index=index // 2, partner=index ^ 1, sign=np.where(index % 2 == 0, -1.0, 1.0))
    half_split = dict(
        pair_index=index % half, partner=(index + half) % head_dim, sign=np.where(index < half, -1.0, 1.0)
    )
    project = lambda weight: (x @ weight.T).reshape(5, heads, head_dim)  # noqa: E731
    llama_cpp = rope_scores(project(file_q), project(file_k), **interleaved)
    hf_q, hf_k = (gguf_io.unpermute_rope_rows(weight, heads) for weight in (file_q, file_k))
    ours = rope_scores(project(hf_q), project(hf_k), **half_split)
    np.testing.assert_allclose(ours, llama_cpp, rtol=1e-12, atol=1e-12)  # float64; only summation order differs
    assert not np.allclose(rope_scores(project(file_q), project(file_k), **half_split), llama_cpp)  # the test can fail


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_hf_weights(), architecture="gpt2")
    with pytest.raises(CheckpointError, match="'gpt2'.*llama"):
        gguf_io.gguf_to_hf_config(gguf_io.read_gguf_metadata(path))


@pytest.mark.parametrize("key, value, problem", [
    ("llama.block_count", 10**9, "1000000000 layers"),  # a corrupt count must not build a billion layers
    ("llama.attention.head_count", 0, "num_attention_heads is 0"),
    ("llama.attention.head_count_kv", 3, "do not group"),
    ("llama.attention.key_length", 15, "odd"),
])
def test_inconsistent_metadata_is_rejected(tmp_path, key, value, problem):
    metadata = gguf_io.read_gguf_metadata(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights()))
    with pytest.raises(CheckpointError, match=f"inconsistent.*{problem}"):
        gguf_io.gguf_to_hf_config({**metadata, key: value})


def test_unknown_tensor_name_is_rejected(tmp_path):
    extra = [("blk.0.attn_q_norm.weight", np.ones(16, np.float32), None)]
    path = write_tiny_gguf(tmp_path / "extra.gguf", tiny_hf_weights(), extra_tensors=extra)
    with pytest.raises(CheckpointError, match="blk.0.attn_q_norm.weight"):
        gguf_io.read_gguf_tensors(path)


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    hf_weights = tiny_hf_weights()
    del hf_weights["model.layers.1.mlp.up_proj.weight"]
    q5_k_bytes = np.zeros((TINY["mlp"], 176), np.uint8)  # one 256-value Q5_K block per row
    extra = [("blk.1.ffn_up.weight", q5_k_bytes, QT.Q5_K)]
    path = write_tiny_gguf(tmp_path / "q5k.gguf", hf_weights, extra_tensors=extra)
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight.*Q5_K"):
        gguf_io.read_gguf_tensors(path)


def test_big_endian_file_is_rejected(tmp_path):
    path = write_tiny_gguf(tmp_path / "be.gguf", tiny_hf_weights(), endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match="big-endian"):
        gguf_io.read_gguf_metadata(path)


# ---------------------------------------------------------------------------------------------------------------
# Bad files: one CheckpointError line naming the file
# ---------------------------------------------------------------------------------------------------------------


def assert_bad_file_error(read, path):
    with pytest.raises(CheckpointError) as error:
        read(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file(tmp_path):
    for read in (gguf_io.read_gguf_metadata, gguf_io.read_gguf_tensors):
        assert "not found" in assert_bad_file_error(read, tmp_path / "absent.gguf")
    assert "not found" in assert_bad_file_error(gguf_io.read_gguf_metadata, tmp_path)  # a folder is not a file


@pytest.mark.parametrize("corrupt", ["empty", "garbage", "wrong_magic", "first_1000_bytes", "cut_in_last_tensor"])
def test_corrupt_tiny_file(tmp_path, corrupt):
    good = write_tiny_gguf(tmp_path / "good.gguf", tiny_hf_weights()).read_bytes()
    bad = {
        "empty": b"",
        "garbage": np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "wrong_magic": b"GGML" + good[4:],
        "first_1000_bytes": good[:1000],
        "cut_in_last_tensor": good[:-100],
    }[corrupt]
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    for read in (gguf_io.read_gguf_metadata, gguf_io.read_gguf_tensors):
        assert "re-download" in assert_bad_file_error(read, path)


@pytest.mark.parametrize("keep", ["first_1000_bytes", "first_half"])
def test_truncated_real_file(real_gguf_path, tmp_path, keep):
    size = real_gguf_path.stat().st_size
    path = tmp_path / real_gguf_path.name
    with real_gguf_path.open("rb") as source, path.open("wb") as copy:
        copy.write(source.read(1000 if keep == "first_1000_bytes" else size // 2))
    assert "re-download" in assert_bad_file_error(gguf_io.read_gguf_metadata, path)


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file, against transformers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_metadata(real_gguf_path):
    return gguf_io.read_gguf_metadata(real_gguf_path)


@pytest.fixture(scope="module")
def transformers_model(hf_real_model):
    return hf_real_model  # loaded once per session (conftest): transformers' GGUF load takes most of a minute


def test_real_metadata_is_plain_python(real_metadata):
    tokens = real_metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and all(isinstance(token, str) for token in tokens)
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert real_metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 shown as its shortest decimal
    assert real_metadata["general.architecture"] == "llama"
    assert "<|im_start|>" in real_metadata["tokenizer.chat_template"]
    json.dumps(real_metadata)  # nothing numpy-typed left


@pytest.mark.slow
def test_real_config(real_metadata, transformers_model):
    config = gguf_io.gguf_to_hf_config(real_metadata)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {key: config[key] for key in expected} == expected
    reference = transformers_model.config.to_dict()
    reference.setdefault("rope_theta", (reference.get("rope_parameters") or {}).get("rope_theta"))
    shared = [key for key in config if key in reference and key not in ("architectures", "model_type")]
    assert len(shared) >= 15, shared
    for key in shared:
        assert config[key] == pytest.approx(reference[key], rel=1e-7), key  # eps: 1e-5 vs its float32 9.9999997e-6


@pytest.mark.slow
def test_real_tensors_match_transformers(real_gguf_path, transformers_model):
    tensors = gguf_io.read_gguf_tensors(real_gguf_path)
    reference = {name: value.numpy() for name, value in transformers_model.state_dict().items()}
    assert set(reference) - set(tensors) == {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    np.testing.assert_array_equal(reference["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert sum(weight.size for weight in tensors.values()) == 134_515_008
    for name, weight in tensors.items():
        assert weight.dtype == np.float32 and weight.shape == reference[name].shape, name
        np.testing.assert_array_equal(weight, reference[name], err_msg=name)  # same arithmetic: exact

