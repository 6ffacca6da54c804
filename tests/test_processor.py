"""smoljax.processor against transformers' SmolVLM image processor, prompt strings and chat template.

Pixel tolerance: both sides resize the same 8-bit pixels with the same Pillow filter, then run the same float steps
(x * rescale in float64 cast to float32, then (x - mean) / std in float32). Any difference could only be float
rounding, under 1e-7 on values in [-1, 1]; 1e-5 leaves room for that while a single 8-bit level (2/255 = 7.8e-3
after normalizing) or a misplaced tile fails.
"""

from __future__ import annotations

import io
import re

import numpy as np
import PIL.Image
import pytest

import vlm_fixtures
from smoljax import processor
from smoljax.errors import CheckpointError, ConfigError, InputError
from smoljax.processor import ImageProcessorConfig, VideoFrames, VLMProcessor
from smoljax.tokenizer import Tokenizer

PIXEL_ATOL = 1e-5
SPLIT_TOKENS = dict(
    fake_token_around_image="<fake_token_around_image>", image_token="<image>", global_image_token="<global-img>"
)
# The 2.2B model's tiles: 384 px, images up to 1536 px.
CONFIG_384 = ImageProcessorConfig(max_image_size=384, size=1536, video_size=384)
NO_SPLIT = ImageProcessorConfig(do_image_splitting=False)
# Where the pixel format is what is under test: small tiles (a 2 x 2 grid plus the global tile) keep those cases fast.
SMALL_TILES = ImageProcessorConfig(max_image_size=128, size=256, video_size=128)
FORMAT_SAMPLES = ("gray", "gray_alpha", "rgba", "sixteen_bit")
# SmolVLM2-500M-Video-Instruct's preprocessor_config.json.
REAL_500M_PREPROCESSOR = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SmolVLMImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": 512}, "processor_class": "SmolVLMProcessor",
    "resample": 1, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 2048},
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arrays():
    return vlm_fixtures.sample_images()


@pytest.fixture(scope="module")
def pil_images():
    return vlm_fixtures.sample_pil_images()


@pytest.fixture(scope="module")
def hf_smolvlm():
    pytest.importorskip("transformers")
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil, processing_smolvlm


@pytest.fixture(scope="session")
def smolvlm_dir(real_gguf_path, tmp_path_factory):
    return vlm_fixtures.build_smolvlm2_tokenizer_dir(tmp_path_factory.mktemp("smolvlm2"), real_gguf_path)


@pytest.fixture(scope="session")
def vlm(smolvlm_dir):
    return VLMProcessor.from_dir(smolvlm_dir)


def hf_preprocess(hf_smolvlm, images, config=ImageProcessorConfig()):
    image_processor_class, _ = hf_smolvlm
    reference = image_processor_class(**config.to_hf_dict())
    return reference(images, return_tensors="np", return_row_col_info=True)


def assert_matches_reference(ours, reference):
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_attention_mask.dtype == bool
    assert ours.pixel_values.shape == reference["pixel_values"].shape
    np.testing.assert_allclose(ours.pixel_values, reference["pixel_values"], rtol=0, atol=PIXEL_ATOL)
    np.testing.assert_array_equal(ours.pixel_attention_mask, reference["pixel_attention_mask"].astype(bool))
    assert ours.rows == reference["rows"] and ours.cols == reference["cols"]


def reference_input(name, array):
    """What transformers is given for a sample array: it misreads some arrays, so those go in as the PIL image or
    the 8-bit picture they stand for."""
    if name == "one_pixel":  # a 1x1x3 array reads as channels-first there
        return PIL.Image.fromarray(array)
    if name == "gray":  # 2-D arrays are refused there
        return PIL.Image.fromarray(array)
    if name == "gray_alpha":  # 2 channels pass through unconverted there
        return PIL.Image.fromarray(array)
    if name == "sixteen_bit":  # Pillow clips 16-bit values at 255; smoljax scales them to 8 bits
        return PIL.Image.fromarray(np.round(array / 257).astype(np.uint8))
    return array


def hf_expanded_text(hf_smolvlm, text, rows, cols, image_seq_len):
    """Each <image> marker replaced by transformers' own prompt string for that image."""
    _, processing_smolvlm = hf_smolvlm
    pieces = text.split("<image>")
    assert len(pieces) - 1 == len(rows)
    strings = [
        processing_smolvlm.get_image_prompt_string(r, c, image_seq_len, **SPLIT_TOKENS) for r, c in zip(rows, cols)
    ]
    return pieces[0] + "".join(s + piece for s, piece in zip(strings, pieces[1:]))


# ---- pixels against transformers --------------------------------------------------------------------------------

SAMPLE_NAMES = ["astronaut", "chelsea", "coffee", "rocket", "one_pixel", "wide", "tall", "gray", "gray_alpha", "rgba",
                "sixteen_bit"]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_array_matches_transformers(hf_smolvlm, arrays, name):
    config = SMALL_TILES if name in FORMAT_SAMPLES else ImageProcessorConfig()
    ours = processor.preprocess_images([[arrays[name]]], config)
    assert_matches_reference(ours, hf_preprocess(hf_smolvlm, [[reference_input(name, arrays[name])]], config))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparent", "CMYK", "1"])
def test_pil_mode_matches_transformers(hf_smolvlm, pil_images, mode):
    ours = processor.preprocess_images([[pil_images[mode]]], SMALL_TILES)
    assert_matches_reference(ours, hf_preprocess(hf_smolvlm, [[pil_images[mode]]], SMALL_TILES))
    assert ours.rows == [[2]] and ours.cols == [[2]]


def test_several_images_per_prompt_and_uneven_batch_match_transformers(hf_smolvlm, arrays):
    batch = [[arrays["wide"], arrays["tall"]], [], [arrays["tall"]]]  # 5 + 5 tiles, none, 5 tiles
    ours = processor.preprocess_images(batch)
    assert_matches_reference(ours, hf_preprocess(hf_smolvlm, batch))
    assert ours.pixel_values.shape[:2] == (3, 10)
    assert ours.pixel_attention_mask[1].sum() == 0 and ours.pixel_attention_mask[2, 5:].sum() == 0


def test_no_splitting_matches_transformers(hf_smolvlm, arrays):
    batch = [[arrays["chelsea"], arrays["tall"]], [arrays["astronaut"]]]
    ours = processor.preprocess_images(batch, NO_SPLIT)
    assert_matches_reference(ours, hf_preprocess(hf_smolvlm, batch, NO_SPLIT))
    assert ours.pixel_values.shape == (2, 2, 3, 512, 512) and ours.rows == [[0, 0], [0]]


def test_384_tiles_match_transformers(hf_smolvlm, arrays):
    batch = [[arrays["rocket"]], [arrays["wide"]]]
    ours = processor.preprocess_images(batch, CONFIG_384)
    assert_matches_reference(ours, hf_preprocess(hf_smolvlm, batch, CONFIG_384))
    assert ours.pixel_values.shape[-2:] == (384, 384)


def test_image_file_matches_array(arrays, tmp_path):
    path = tmp_path / "chelsea.png"
    PIL.Image.fromarray(arrays["chelsea"]).save(path)
    from_file = processor.preprocess_images([[path, str(path)]])
    from_array = processor.preprocess_images([[arrays["chelsea"], arrays["chelsea"]]])
    np.testing.assert_array_equal(from_file.pixel_values, from_array.pixel_values)


# ---- loading images ----------------------------------------------------------------------------------------------


def test_load_image_converts_formats_to_rgb(arrays, pil_images):
    sixteen_bit = arrays["sixteen_bit"]
    expected_gray = np.round(sixteen_bit / 257).astype(np.uint8)
    for source in (sixteen_bit, pil_images["I;16"], PIL.Image.fromarray(sixteen_bit.astype(np.int32))):
        loaded = processor.load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), np.repeat(expected_gray[..., None], 3, -1))
    floats = np.linspace(0, 1, 12).reshape(2, 2, 3)
    np.testing.assert_array_equal(np.asarray(processor.load_image(floats)), np.round(floats * 255).astype(np.uint8))
    transparent = np.zeros((2, 2, 4), np.uint8)  # black, fully transparent -> white
    assert np.asarray(processor.load_image(transparent)).min() == 255
    assert np.asarray(processor.load_image(PIL.Image.fromarray(transparent))).min() == 255


def test_load_image_applies_exif_orientation_to_files(arrays, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    PIL.Image.fromarray(arrays["coffee"]).save(path, exif=exif)  # 600 wide, 400 high
    assert processor.load_image(path).size == (400, 600)


def test_bad_images_raise_input_error(tmp_path, arrays):
    png, jpeg = io.BytesIO(), io.BytesIO()
    PIL.Image.fromarray(arrays["coffee"]).save(png, "PNG")
    PIL.Image.fromarray(arrays["coffee"]).save(jpeg, "JPEG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "notes.txt").write_text("not a picture\n")
    cases = [
        (tmp_path / "cut.png", r"cut\.png.*corrupt or truncated"),
        (tmp_path / "cut.jpg", r"cut\.jpg.*corrupt or truncated"),
        (tmp_path / "notes.txt", r"notes\.txt.*not an image file"),
        (tmp_path / "missing.png", r"missing\.png.*does not exist"),
        (str(tmp_path / "missing.png"), r"missing\.png.*does not exist"),
        (tmp_path, r"is a directory"),
        (np.zeros((0, 5, 3), np.uint8), r"zero size \(shape \(0, 5, 3\)\)"),
        (PIL.Image.new("RGB", (0, 5)), r"zero size \(0x5\)"),
        (np.full((4, 4, 3), 2.0), r"values in \[0, 1\]"),
        (np.zeros((3, 8, 8), np.uint8), r"channels last"),
        (42, r"file path, a PIL image or a numpy array"),
    ]
    for source, message in cases:
        with pytest.raises(InputError, match=message):
            processor.load_image(source)
    with pytest.raises(InputError, match=r"cut\.jpg"):
        processor.preprocess_images([[arrays["chelsea"], tmp_path / "cut.jpg"]])


def test_preprocess_images_rejects_bad_nesting(arrays):
    with pytest.raises(InputError, match="one list per prompt"):
        processor.preprocess_images([arrays["chelsea"]])
    with pytest.raises(InputError, match="no images"):
        processor.preprocess_images([[], []])


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_reads_the_real_preprocessor_config(tmp_path):
    config = ImageProcessorConfig.from_hf_dict(REAL_500M_PREPROCESSOR)
    assert config == ImageProcessorConfig()
    assert ImageProcessorConfig.from_hf_dict(config.to_hf_dict()) == config
    assert config.to_hf_dict() == REAL_500M_PREPROCESSOR
    assert ImageProcessorConfig.from_hf_dict(CONFIG_384.to_hf_dict()) == CONFIG_384
    assert ImageProcessorConfig(image_mean=[0.5, 0.5, 0.5]) == config  # lists are kept as tuples
    assert ImageProcessorConfig.from_dir(tmp_path) == ImageProcessorConfig()  # no file: the defaults
    (tmp_path / "preprocessor_config.json").write_text('{"max_image_size": {"longest_edge": 384}}')
    assert ImageProcessorConfig.from_dir(tmp_path).tile_size == 384


def test_config_matches_transformers_reading(hf_smolvlm):
    image_processor_class, _ = hf_smolvlm
    reference = image_processor_class(**CONFIG_384.to_hf_dict()).to_dict()
    for key in ("size", "max_image_size", "resample", "rescale_factor", "do_image_splitting", "video_sampling"):
        assert reference[key] == CONFIG_384.to_hf_dict()[key], key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"crop_size": {"height": 10}}, "'crop_size' is not one smoljax applies"),
        ({"size": 2048}, 'size must look like {"longest_edge": 512}'),
        ({"max_image_size": {"longest_edge": 0}}, "max_image_size must be a positive integer"),
        ({"resample": 99}, "resample must be a Pillow filter id"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be positive"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be three numbers"),
        ({"do_resize": "yes"}, "do_resize must be true or false"),
        ({"video_sampling": {"fps": 1, "frames": 3}}, "video_sampling key 'frames'"),
    ],
)
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImageProcessorConfig.from_hf_dict({**REAL_500M_PREPROCESSOR, **change})


# ---- prompt strings and token ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("image_seq_len", [64, 81])
def test_image_prompt_string_matches_transformers(hf_smolvlm, image_seq_len):
    _, processing_smolvlm = hf_smolvlm
    for rows, cols in [(0, 0), (1, 1), (1, 4), (2, 3), (4, 4), (6, 6)]:
        expected = processing_smolvlm.get_image_prompt_string(rows, cols, image_seq_len, **SPLIT_TOKENS)
        assert processor.image_prompt_string(rows, cols, image_seq_len) == expected


def test_prompt_helpers():
    assert processor.place_image_markers("What is it?", 2) == "<image><image>What is it?"
    assert processor.place_image_markers("Compare <image> with <image>", 2) == "Compare <image> with <image>"
    assert processor.expand_image_markers("a<image>b", [0], [0], 2) == (
        "a<fake_token_around_image><global-img><image><image><fake_token_around_image>b"
    )
    with pytest.raises(InputError, match="the text has 1 <image> markers but 2 images were given"):
        processor.expand_image_markers("a<image>b", [0, 1], [0, 1], 64)
    with pytest.raises(InputError, match="both be 0 or both positive"):
        processor.image_prompt_string(0, 2, 64)


def test_special_tokens_are_single_ids(vlm):
    tokenizer = vlm.tokenizer
    assert tokenizer.vocab_size == vlm_fixtures.SMOLVLM2_VOCAB_SIZE
    assert tokenizer.encode("<image>") == [vlm_fixtures.IMAGE_ID]
    wrapper = tokenizer.encode("<fake_token_around_image><global-img>")
    assert wrapper == [vlm_fixtures.FAKE_IMAGE_ID, vlm_fixtures.GLOBAL_IMAGE_ID]
    assert tokenizer.encode("<row_1_col_1><row_6_col_6>") == [49153, 49188]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 49279, 2)
    assert vlm.image_seq_len == 64 and vlm.image_config == ImageProcessorConfig()


def test_input_ids_and_pixels_match_transformers(hf_smolvlm, vlm, smolvlm_dir, arrays):
    prompts = ["<|im_start|>User:<image>What is in this image?<end_of_utterance>\nAssistant:",
               "Compare <image> and\n<image>, then count 1234."]
    images = [[arrays["chelsea"]], [arrays["tall"], arrays["wide"]]]
    ours = vlm(prompts, images=images)

    reference = hf_preprocess(hf_smolvlm, images)
    assert_matches_reference(ours, reference)
    expected_texts = [
        hf_expanded_text(hf_smolvlm, prompt, rows, cols, 64)
        for prompt, rows, cols in zip(prompts, reference["rows"], reference["cols"])
    ]
    assert ours.input_ids == [vlm.tokenizer.encode(text) for text in expected_texts]
    from transformers import AutoTokenizer  # the fixture directory also loads in transformers, with the same ids

    hf_tokenizer = AutoTokenizer.from_pretrained(smolvlm_dir)
    assert ours.input_ids == hf_tokenizer(expected_texts, add_special_tokens=False)["input_ids"]
    tiles = ours.pixel_attention_mask[:, :, 0, 0].sum(axis=1)
    assert [ids.count(vlm_fixtures.IMAGE_ID) for ids in ours.input_ids] == list(64 * tiles)


def test_text_only_prompts_have_no_pixels(vlm):
    inputs = vlm(["Hello there"])
    assert inputs.pixel_values is None and inputs.pixel_attention_mask is None
    assert inputs.input_ids == [vlm.tokenizer.encode("Hello there")]


def test_processor_marker_count_mismatch(vlm, arrays):
    with pytest.raises(InputError, match="prompt 0 has 1 <image> markers but 2 images were given"):
        vlm(["<image>Describe"], images=[[arrays["chelsea"], arrays["rocket"]]])
    with pytest.raises(InputError, match="prompt 1 has 1 <image> markers but 0 images were given"):
        vlm(["Hi", "<image>Describe"])
    with pytest.raises(InputError, match="images has 1 lists for 2 prompts"):
        vlm(["<image>", "<image>"], images=[[arrays["chelsea"]]])


def test_processor_refuses_grids_the_tokenizer_cannot_name(vlm):
    unresized = VLMProcessor(vlm.tokenizer, ImageProcessorConfig(do_resize=False), image_seq_len=64)
    with pytest.raises(InputError, match=r"split into 1x8 tiles but the tokenizer has no <row_1_col_8> token"):
        unresized(["<image>"], images=[[np.zeros((20, 3600, 3), np.uint8)]])  # 3600 px wide -> 8 tiles of 512


def test_processor_rejects_a_text_only_tokenizer():
    import tokenizers

    vocabulary = {"<unk>": 0, "<|im_start|>": 1}  # a text-only vocabulary
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
    with pytest.raises(CheckpointError, match="no single token <image>"):
        VLMProcessor(Tokenizer(backend, bos_token="<|im_start|>"))


# ---- chat template -----------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
    {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "video"}]},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(hf_smolvlm, vlm, smolvlm_dir, add_generation_prompt):
    from transformers import AutoTokenizer

    _, processing_smolvlm = hf_smolvlm
    hf_tokenizer = AutoTokenizer.from_pretrained(smolvlm_dir)
    for messages in (CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]):
        expected = hf_tokenizer.apply_chat_template(
            messages, chat_template=processing_smolvlm.DEFAULT_CHAT_TEMPLATE, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        assert vlm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        # A tokenizer without a chat template: the processor falls back to SmolVLM's own.
        untemplated = VLMProcessor(Tokenizer(vlm.tokenizer.backend, bos_token="<|im_start|>"))
        assert untemplated.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_string_content(vlm):
    as_string = vlm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert as_string == vlm.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert as_string == "<|im_start|>User: Hi<end_of_utterance>\nAssistant:"


# ---- video -------------------------------------------------------------------------------------------------------


def test_number_words():
    assert [processor.number_words(n) for n in (0, 7, 21, 64, 100, 121, 1001, 1234)] == [
        "zero", "seven", "twenty-one", "sixty-four", "one hundred", "one hundred and twenty-one",
        "one thousand and one", "one thousand, two hundred and thirty-four",
    ]
    num2words = pytest.importorskip("num2words").num2words  # what transformers spells frame counts with
    for n in [*range(1200), 20_000, 123_456, 999_999]:
        assert processor.number_words(n) == num2words(n), n


def test_video_prompt_string_matches_transformers_template(hf_smolvlm):
    _, processing_smolvlm = hf_smolvlm
    timestamps, duration = [0.0, 33 / 30, 61.5, 3725.0], 3730.2
    single = processing_smolvlm.get_image_prompt_string(0, 0, 64, **SPLIT_TOKENS)
    expected = processing_smolvlm.DEFAULT_VIDEO_INTRO.format(frame_count="four", video_duration="1:02:10")
    for stamp in ("00:00", "00:01", "01:01", "62:05"):
        expected += processing_smolvlm.FRAME_TIMESTAMP_MESSAGE.format(timestamp=stamp) + single
    expected += processing_smolvlm.DEFAULT_MEDIA_OUTTRO
    assert processor.video_prompt_string(timestamps, duration, 64) == expected


@pytest.mark.parametrize("total_frames, source_fps", [(300, 30), (1000, 10), (5, 24), (7200, 24), (3000, 29.97)])
def test_frame_sampling_matches_transformers(hf_smolvlm, total_frames, source_fps):
    pytest.importorskip("torch")  # transformers' video module imports it
    from types import SimpleNamespace

    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=total_frames, fps=source_fps, duration=total_frames / source_fps)
    defaults = SimpleNamespace(num_frames=64, fps=1)  # video_sampling of the real config
    expected = SmolVLMVideoProcessor.sample_frames(defaults, metadata).tolist()
    video = processor.sample_video_frames(list(range(total_frames)), source_fps)
    assert video.frames == expected
    assert video.timestamps == [i / source_fps for i in expected]
    assert video.duration == total_frames / source_fps


def test_frame_sampling_by_hand():
    video = processor.sample_video_frames(list(range(300)), 30)  # 10 s at 30 fps -> 10 frames, first to last
    assert video.frames == [0, 33, 66, 99, 132, 166, 199, 232, 265, 299]
    long_video = processor.sample_video_frames(list(range(1000)), 10)  # 100 s: 64 frames, skipping 1 s at each end
    assert len(long_video.frames) == 64 and long_video.frames[0] == 10 and long_video.frames[-1] == 990


def test_preprocess_video_resizes_each_frame_to_one_tile(arrays):
    rocket = arrays["rocket"]  # 427 x 640 -> longest edge 512: 341.6 -> 341 -> rounded up to even 342
    expected = PIL.Image.fromarray(rocket).resize((512, 342), PIL.Image.Resampling.LANCZOS)
    expected = np.asarray(expected.resize((512, 512), PIL.Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    frames = processor.preprocess_video([rocket, rocket[:, ::-1]])
    assert frames.shape == (2, 3, 512, 512) and frames.dtype == np.float32
    np.testing.assert_allclose(frames[0], (expected / 255 - 0.5) / 0.5, rtol=0, atol=PIXEL_ATOL)
    assert processor.preprocess_video([rocket], CONFIG_384).shape == (1, 3, 384, 384)


def test_processor_expands_videos_and_images_in_marker_order(vlm, arrays):
    video = VideoFrames(frames=[arrays["wide"], arrays["rocket"]], timestamps=[0.0, 1.0], duration=2.0)
    inputs = vlm(["<video>Then <image>"], images=[[arrays["tall"]]], videos=[[video]])
    video_text = processor.video_prompt_string([0.0, 1.0], 2.0, 64)
    expected_text = video_text + "Then " + processor.image_prompt_string(4, 1, 64)
    assert inputs.input_ids == [vlm.tokenizer.encode(expected_text)]
    np.testing.assert_array_equal(inputs.pixel_values[0, :2], processor.preprocess_video(video.frames))
    image_tiles = processor.preprocess_images([[arrays["tall"]]]).pixel_values[0]
    np.testing.assert_array_equal(inputs.pixel_values[0, 2:], image_tiles)
    assert inputs.rows == [[4]] and inputs.cols == [[1]]
    with pytest.raises(InputError, match="1 <video> markers but 0 videos"):
        vlm(["<video>"])
    with pytest.raises(InputError, match="2 frames but 1 timestamps"):
        VideoFrames(frames=[arrays["wide"], arrays["wide"]], timestamps=[0.0], duration=1.0)
