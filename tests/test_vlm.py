"""SmolVLM2 against transformers' SmolVLMForConditionalGeneration, on the CPU in f32.

The reference is randomly initialised with the real SmolVLM2-500M widths (SigLIP 768 wide, 12 heads; SmolLM2-360M
text tower 960 wide, 15/5 heads, vocab 49280) and two layers per tower, saved by transformers and loaded by smoljax,
so checkpoint names, layouts, the image path and the decoder are all compared. Prompts and pixels come from
smoljax's processor; their equality with transformers' processor is tested in test_processor.py.

Tolerances: image features and logits within 1e-3 (absolute, f32). Both sides compute the same f32 math in a
different order (fused matmuls, f32 LayerNorm statistics); observed differences are around 1e-5.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoljax
from smoljax import generation
from smoljax.config import VisionConfig, VLMConfig, preset
from smoljax.errors import InputError
from smoljax.models import smolvlm2
from smoljax.params import abstract_params, vlm_specs

from vlm_fixtures import build_smolvlm2_tokenizer_dir, sample_images

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS = 2
# The reference's LM head is scaled up so random logits are well separated: greedy continuations then test the
# model, not which side breaks a near-tie.
HEAD_SCALE = 30.0


def small_500m_config() -> VLMConfig:
    config = preset("SmolVLM2-500M-Video-Instruct")
    return config.replace(text=config.text.replace(num_hidden_layers=LAYERS),
                          vision=VisionConfig(num_hidden_layers=LAYERS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, real_gguf_path):
    """An HF SmolVLM2 directory: transformers' random model + the SmolVLM2-style tokenizer and processor files."""
    directory = tmp_path_factory.mktemp("smolvlm2")
    build_smolvlm2_tokenizer_dir(directory, real_gguf_path)
    hf_config = transformers.SmolVLMConfig(**small_500m_config().to_hf_dict())
    torch.manual_seed(0)
    model = transformers.SmolVLMForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(model_dir):
    return smoljax.load(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def processor(loaded):
    return loaded.processor


@pytest.fixture(scope="module")
def unsplit_processor(processor):
    """One tile per image: the generation tests compare decoding, which the tile count does not change."""
    from smoljax.processor import VLMProcessor

    image_config = dataclasses.replace(processor.image_config, do_image_splitting=False)
    return VLMProcessor(processor.tokenizer, image_config, processor.image_seq_len)


@pytest.fixture(scope="module")
def images():
    return sample_images()


def _hf_inputs(batch):
    ids = [torch.tensor(row) for row in batch.input_ids]
    return (torch.nn.utils.rnn.pad_sequence(ids, batch_first=True), torch.from_numpy(batch.pixel_values),
            torch.from_numpy(batch.pixel_attention_mask))


def test_config_reads_what_transformers_writes(model_dir, loaded):
    written = json.loads((model_dir / "config.json").read_text())
    assert written["model_type"] == "smolvlm"
    assert loaded.config == small_500m_config()
    assert loaded.config.image_seq_len == 64


def test_image_features_match_transformers(hf_model, loaded, processor, images):
    """Encoder + pixel shuffle + projection, on split tiles and on a padded (wide) global image."""
    batch = processor(["<image><image>"], [[images["chelsea"], images["wide"]]])
    with torch.no_grad():
        reference = hf_model.model.get_image_features(
            torch.from_numpy(batch.pixel_values), torch.from_numpy(batch.pixel_attention_mask)).pooler_output
    reference = torch.cat(list(reference)).numpy()
    real = np.any(batch.pixel_values[0].reshape(batch.pixel_values.shape[1], -1) != 0, axis=-1)
    features = smolvlm2.image_features(loaded.params, jnp.asarray(batch.pixel_values[0][real]),
                                       jnp.asarray(batch.pixel_attention_mask[0][real]), loaded.config)
    features = np.asarray(features).reshape(-1, features.shape[-1])
    assert features.shape == reference.shape
    np.testing.assert_allclose(features, reference, atol=1e-3, rtol=0)


def test_logits_match_transformers(hf_model, loaded, processor, images):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]}])
    batch = processor([prompt], [[images["astronaut"]]])
    input_ids, pixel_values, pixel_mask = _hf_inputs(batch)
    with torch.no_grad():
        reference = hf_model(input_ids=input_ids, pixel_values=pixel_values,
                             pixel_attention_mask=pixel_mask).logits.numpy()
    real = np.any(batch.pixel_values[0].reshape(batch.pixel_values.shape[1], -1) != 0, axis=-1)
    logits = smolvlm2.forward(loaded.params, jnp.asarray(batch.input_ids), loaded.config,
                              pixel_values=jnp.asarray(batch.pixel_values[0][real]),
                              pixel_mask=jnp.asarray(batch.pixel_attention_mask[0][real]))
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-3, rtol=0)


def test_greedy_continuation_matches_transformers(hf_model, loaded, unsplit_processor, images):
    processor = unsplit_processor
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}])
    batch = processor([prompt], [[images["coffee"]]])
    input_ids, pixel_values, pixel_mask = _hf_inputs(batch)
    with torch.no_grad():
        reference = hf_model.generate(input_ids=input_ids, pixel_values=pixel_values, pixel_attention_mask=pixel_mask,
                                      max_new_tokens=32, min_new_tokens=32, do_sample=False)
    reference = reference[0, input_ids.shape[1]:].tolist()
    result = generation.generate(loaded.params, loaded.config, batch.input_ids, max_new_tokens=32, stop_tokens=[],
                                 pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask)
    assert result.tokens[0] == reference


def test_batch_with_different_image_counts_equals_single_runs(loaded, unsplit_processor, images):
    processor = unsplit_processor
    prompts = ["<image>What is here?", "Compare <image> and <image>.", "No picture, just text."]
    prompt_images = [[images["rocket"]], [images["tall"], images["chelsea"]], []]
    batch = processor(prompts, prompt_images)
    together = generation.generate(loaded.params, loaded.config, batch.input_ids, max_new_tokens=8, stop_tokens=[],
                                   pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask)
    for index, (prompt, own_images) in enumerate(zip(prompts, prompt_images)):
        single = processor([prompt], [own_images])
        alone = generation.generate(loaded.params, loaded.config, single.input_ids, max_new_tokens=8,
                                    stop_tokens=[], pixel_values=single.pixel_values,
                                    pixel_attention_mask=single.pixel_attention_mask)
        assert together.tokens[index] == alone.tokens[0], index


def test_fused_decode_layers_continue_an_image_prompt_as_the_xla_layers(loaded, unsplit_processor, images):
    """The fused batch-1 decode kernels (the GPU default for one row; interpreted here) on SmolVLM2's text model:
    15 query heads over 5 KV heads, widths 960 and 2560, after an image prompt."""
    batch = unsplit_processor(["<image>What is here?"], [[images["rocket"]]])
    tokens = {fused: generation.generate(loaded.params, loaded.config, batch.input_ids, max_new_tokens=3,
                                         stop_tokens=[], pixel_values=batch.pixel_values,
                                         pixel_attention_mask=batch.pixel_attention_mask, fused_layers=fused).tokens
              for fused in (False, True)}
    assert tokens[True] == tokens[False]

def test_save_pretrained_round_trips_through_transformers(tmp_path, loaded, processor, unsplit_processor, images,
                                                          hf_model):
    target = tmp_path / "saved"
    smoljax.save_pretrained(target, loaded.config, loaded.params, processor=processor)
    reloaded = transformers.SmolVLMForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    batch = unsplit_processor(["<image>Hello"], [[images["rocket"]]])
    input_ids, pixel_values, pixel_mask = _hf_inputs(batch)
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, pixel_values=pixel_values, pixel_attention_mask=pixel_mask).logits
        got = reloaded(input_ids=input_ids, pixel_values=pixel_values, pixel_attention_mask=pixel_mask).logits
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    again = smoljax.load(target)
    assert again.config.replace(text=again.config.text.replace(torch_dtype="any")) == \
        loaded.config.replace(text=loaded.config.text.replace(torch_dtype="any"))
    assert again.processor.image_seq_len == processor.image_seq_len


def test_placeholder_count_mismatch_is_a_clear_error(loaded, processor, images):
    batch = processor(["<image>Hi"], [[images["rocket"]]])
    short_ids = [batch.input_ids[0][:-70] + batch.input_ids[0][-5:]]  # drops image placeholders
    with pytest.raises(InputError, match="<image> tokens but the images give"):
        generation.generate(loaded.params, loaded.config, short_ids, max_new_tokens=2,
                            pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask)


def test_images_for_a_text_model_are_refused(images):
    config = preset("SmolLM2-135M").replace(num_hidden_layers=1, vocab_size=64, hidden_size=64,
                                            intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=32)
    params = smoljax.init_params(smoljax.llama_specs(config), jax.random.key(0))
    with pytest.raises(InputError, match="text model"):
        generation.generate(params, config, [[1, 2]], max_new_tokens=2,
                            pixel_values=np.ones((1, 1, 3, 16, 16), np.float32))


@pytest.mark.parametrize("name", ["SmolVLM2-500M-Video-Instruct", "SmolVLM2-2.2B-Instruct"])
def test_full_size_models_trace_with_eval_shape(name):
    """The real sizes, shape-checked without allocating: params, image encoder and the merged forward."""
    config = preset(name)
    params = abstract_params(vlm_specs(config, jnp.bfloat16))
    tile = config.vision.image_size
    tokens = jax.ShapeDtypeStruct((1, 3 * config.image_seq_len + 8), jnp.int32)
    pixels = jax.ShapeDtypeStruct((3, 3, tile, tile), jnp.float32)
    masks = jax.ShapeDtypeStruct((3, tile, tile), jnp.bool_)
    logits = jax.eval_shape(lambda p, t, x, m: smolvlm2.forward(p, t, config, pixel_values=x, pixel_mask=m),
                            params, tokens, pixels, masks)
    assert logits.shape == (1, tokens.shape[1], config.text.vocab_size)
    features = jax.eval_shape(lambda p, x, m: smolvlm2.image_features(p, x, m, config), params, pixels, masks)
    assert features.shape == (3, config.image_seq_len, config.text.hidden_size)


# ---- CLI -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory, real_gguf_path):
    """A SmolVLM2 directory with tiny random towers (real tile, patch and token layout), for fast CLI runs."""
    from smoljax.processor import VLMProcessor

    config = preset("SmolVLM2-500M-Video-Instruct")
    config = config.replace(
        text=config.text.replace(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=32),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    tokenizer_dir = build_smolvlm2_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"), real_gguf_path)
    params = smoljax.init_params(vlm_specs(config), jax.random.key(0))
    directory = tmp_path_factory.mktemp("tiny_vlm")
    smoljax.save_pretrained(directory, config, params, processor=VLMProcessor.from_dir(tokenizer_dir))
    return directory


@pytest.fixture(scope="module")
def photo(tmp_path_factory, images):
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "cat.jpg"
    Image.fromarray(images["chelsea"]).save(path)
    return path


def _cli_json(capsys, argv):
    from smoljax import cli

    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_generate_with_images_follows_the_json_contract(capsys, tiny_vlm_dir, photo):
    loaded = smoljax.load(tiny_vlm_dir)
    out = _cli_json(capsys, ["generate", "--model", str(tiny_vlm_dir), "--image", str(photo), "--prompt",
                             "What animal is this?", "--max-new-tokens", "4", "--json"])
    assert set(out) == {"prompt_tokens", "tokens", "text", "tokens_per_s"}
    expected = loaded.processor(["<image>What animal is this?"], [[str(photo)]]).input_ids[0]
    assert out["prompt_tokens"] == expected  # no marker: the image goes before the text
    assert 1 <= len(out["tokens"]) <= 4
    marked = _cli_json(capsys, ["generate", "--model", str(tiny_vlm_dir), "--image", str(photo), "--prompt",
                                "Look: <image> What is it?", "--max-new-tokens", "2", "--json"])
    assert marked["prompt_tokens"] == loaded.processor(["Look: <image> What is it?"], [[str(photo)]]).input_ids[0]


def test_cli_score_with_images_reports_expanded_ids(capsys, tiny_vlm_dir, photo):
    loaded = smoljax.load(tiny_vlm_dir)
    out = _cli_json(capsys, ["score", "--model", str(tiny_vlm_dir), "--image", str(photo), "--text", "A cat.",
                             "--json"])
    batch = loaded.processor(["<image>A cat."], [[str(photo)]])
    assert out["tokens"] == batch.input_ids[0]
    assert out["logprobs"][0] is None and len(out["logprobs"]) == len(out["tokens"])
    logits = smolvlm2.forward(loaded.params, jnp.asarray(batch.input_ids), loaded.config,
                              pixel_values=jnp.asarray(batch.pixel_values[0]),
                              pixel_mask=jnp.asarray(batch.pixel_attention_mask[0]))
    expected = jax.nn.log_softmax(logits[0, :-1], axis=-1)[np.arange(len(out["tokens"]) - 1), out["tokens"][1:]]
    np.testing.assert_allclose(out["logprobs"][1:], np.asarray(expected), atol=1e-4)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xd8\xff\xe0 truncated jpeg", "image"),
    (b"just some text, not a picture\n", "image"),
])
def test_cli_bad_image_files_give_one_line(capsys, tmp_path, tiny_vlm_dir, content, message):
    from smoljax import cli

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    code = cli.main(["generate", "--model", str(tiny_vlm_dir), "--image", str(bad), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and str(bad) in err


def test_cli_image_count_mismatch_and_text_model_errors(capsys, tiny_vlm_dir, photo, real_gguf_path):
    from smoljax import cli

    code = cli.main(["generate", "--model", str(tiny_vlm_dir), "--image", str(photo), "--prompt",
                     "<image> and <image>"])
    err = capsys.readouterr().err
    assert code == 2 and "2 <image> markers but 1 images" in err
    code = cli.main(["generate", "--model", str(real_gguf_path), "--image", str(photo), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and "text model" in err


def test_zero_sized_image_is_a_clear_error(loaded, processor):
    with pytest.raises(InputError, match="zero|empty|0x"):
        processor(["<image>"], [[np.zeros((0, 5, 3), np.uint8)]])


def test_blank_tile_rule_scans_tiles_whose_first_values_are_zero():
    """HF's rule: an all-zero tile is batch padding. The probe of each tile's first values must not call a tile blank
    when its only non-zero value is at the very end."""
    from smoljax.generation import _real_tiles

    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 4, 3, 64, 64)).astype(np.float32)
    pixels[1, 2:] = 0.0  # row 1 has two images' worth of padding
    pixels[0, 1] = 0.0
    pixels[0, 1, 2, 63, 63] = 0.25  # zero everywhere but the last value: real
    expected = np.any(pixels.reshape(2, 4, -1) != 0, axis=-1)
    np.testing.assert_array_equal(_real_tiles(pixels), expected)
    np.testing.assert_array_equal(expected, [[True, True, True, True], [True, True, False, False]])
