"""Image preprocessing and prompt expansion for SmolVLM2, with numpy and Pillow only.

Images become 8-bit RGB, are resized so their longest edge is `size` (2048), grown to whole tiles, cut into
`max_image_size` (512) tiles in row-major order plus one global tile of the whole image, then rescaled to [0, 1] and
normalized. Each `<image>` marker in a prompt becomes the tokens the model expects for that image: per tile
`<fake_token_around_image><row_r_col_c>` and `image_seq_len` `<image>` tokens, then the global tile between
`<fake_token_around_image><global-img>` ... `<fake_token_around_image>`. The arithmetic follows transformers'
SmolVLM image processor step by step (same Pillow resampler on the same 8-bit pixels), so results match it.

Videos are lists of frames: each frame is one global tile (no splitting), announced by a timestamp line.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from smoljax.errors import CheckpointError, ConfigError, InputError
from smoljax.jsonfiles import read_json_object
from smoljax.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ImageLike",
    "ImageProcessorConfig",
    "ProcessedImages",
    "VLMInputs",
    "VLMProcessor",
    "VideoFrames",
    "expand_image_markers",
    "image_prompt_string",
    "load_image",
    "number_words",
    "place_image_markers",
    "preprocess_images",
    "preprocess_video",
    "sample_video_frames",
    "sampled_frame_indices",
    "video_prompt_string",
]

ImageLike = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # a text marker only: each becomes the frames' image tokens, never a token id
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"

# The video prompt the SmolVLM2 models were trained with.
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTTRO = "\n\n"

# The reference processor caps the longest edge after its first resize at 4K.
MAX_IMAGE_EDGE = 4096

# SmolVLM's chat template: "<|im_start|>", then per message "Role:" (no space when the message opens with an image)
# and its text, image and video items, closed by "<end_of_utterance>\n"; "Assistant:" asks for the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{{- '<|im_start|>' -}}"
    "{%- for message in messages -%}"
    "{%- set parts = message['content'] -%}"
    "{{- message['role'] | capitalize -}}"
    "{{- ':' if parts[0]['type'] == 'image' else ': ' -}}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

_MEDIA_MARKER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
_RESAMPLE_FILTERS = frozenset(int(member) for member in PIL.Image.Resampling)
# preprocessor_config.json keys that only name classes; they change nothing here.
_METADATA_KEYS = frozenset({"image_processor_type", "processor_class", "return_row_col_info"})


# ---- config ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProcessorConfig:
    """SmolVLM2's preprocessor_config.json, with `{"longest_edge": n}` dicts flattened to `n`.

    Defaults are SmolVLM2-500M-Video-Instruct's. `max_image_size` is the tile edge the vision tower sees (512 for the
    500M model, 384 for 2.2B). `video_*` mirror `video_sampling` (`fps`, `max_frames`, `video_size.longest_edge`).
    Outputs are always RGB and always padded to one array, so `do_convert_rgb` and `do_pad` are kept for round trips.
    """

    do_convert_rgb: bool = True
    do_image_splitting: bool = True
    do_normalize: bool = True
    do_pad: bool = True
    do_rescale: bool = True
    do_resize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_image_size: int = 512
    resample: int = int(PIL.Image.Resampling.LANCZOS)
    rescale_factor: float = 1 / 255
    size: int = 2048
    video_fps: float = 1
    video_max_frames: int = 64
    video_size: int = 512

    def __post_init__(self) -> None:
        for name in ("image_mean", "image_std"):  # lists from JSON or callers; tuples keep the config hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("do_convert_rgb", "do_image_splitting", "do_normalize", "do_pad", "do_rescale", "do_resize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_image_size", "size", "video_max_frames", "video_size"):
            if not _is_positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("rescale_factor", "video_fps"):
            if not _is_positive_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name, positive in (("image_mean", False), ("image_std", True)):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(_is_number(v) for v in value)):
                raise ConfigError(f"{name} must be three numbers (one per RGB channel), got {value!r}")
            if positive and not all(v > 0 for v in value):
                raise ConfigError(f"image_std must be positive, got {value!r}")
        if not _is_int(self.resample) or self.resample not in _RESAMPLE_FILTERS:
            raise ConfigError(f"resample must be a Pillow filter id {sorted(_RESAMPLE_FILTERS)}, got {self.resample!r}")

    @property
    def tile_size(self) -> int:
        """Edge in pixels of every tile the vision tower sees."""
        return self.max_image_size

    @classmethod
    def from_hf_dict(cls, d: Mapping) -> ImageProcessorConfig:
        """Build from the contents of a preprocessor_config.json; raises ConfigError on unknown keys or bad values."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a preprocessor config must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("video_")} | {"video_sampling"}
        unknown = sorted(set(d) - known - _METADATA_KEYS)
        if unknown:
            raise ConfigError(
                f"preprocessor config key {unknown[0]!r} is not one smoljax applies; remove it or use transformers"
            )
        values = {key: value for key, value in d.items() if key in known and key != "video_sampling"}
        for key in ("size", "max_image_size"):
            if key in values:
                values[key] = _longest_edge(values[key], key)
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = _per_channel(values[key], key)
        values.update(_video_sampling_fields(d.get("video_sampling", {})))
        return cls(**values)

    def to_hf_dict(self) -> dict:
        """The preprocessor_config.json contents transformers writes for SmolVLM."""
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_image_splitting": self.do_image_splitting,
            "do_normalize": self.do_normalize,
            "do_pad": self.do_pad,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "SmolVLMImageProcessor",
            "image_std": list(self.image_std),
            "max_image_size": {"longest_edge": self.max_image_size},
            "processor_class": "SmolVLMProcessor",
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"longest_edge": self.size},
            "video_sampling": {
                "fps": self.video_fps,
                "max_frames": self.video_max_frames,
                "video_size": {"longest_edge": self.video_size},
            },
        }

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` from a model directory; the defaults when the directory has none."""
        return cls.from_hf_dict(_read_json_object(Path(path), "preprocessor_config.json"))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    is_real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return is_real and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _longest_edge(value: Any, key: str) -> Any:
    if isinstance(value, Mapping) and set(value) == {"longest_edge"}:
        return value["longest_edge"]
    raise ConfigError(f'{key} must look like {{"longest_edge": 512}}, got {value!r}')


def _per_channel(value: Any, key: str) -> tuple:
    # transformers accepts one number for all channels, or one per channel.
    if _is_number(value):
        return (value,) * 3
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ConfigError(f"{key} must be a number or a list of three numbers, got {value!r}")


def _video_sampling_fields(sampling: Any) -> dict:
    if not isinstance(sampling, Mapping):
        raise ConfigError(f"video_sampling must be a JSON object, got {sampling!r}")
    unknown = sorted(set(sampling) - {"fps", "max_frames", "video_size"})
    if unknown:
        raise ConfigError(f"video_sampling key {unknown[0]!r} is not one smoljax applies (fps, max_frames, video_size)")
    fields = {"fps": "video_fps", "max_frames": "video_max_frames"}
    values = {fields[key]: sampling[key] for key in fields if key in sampling}
    if "video_size" in sampling:
        values["video_size"] = _longest_edge(sampling["video_size"], "video_sampling.video_size")
    return values


def _read_json_object(directory: Path, name: str) -> dict:
    """The JSON object in `directory/name`, {} when that file is absent."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory: pass a SmolVLM2 model directory")
    return read_json_object(directory / name)


# ---- loading images ----------------------------------------------------------------------------------------------

# Pillow converts these modes to RGB by clipping at 255, which turns most 16-bit photos white: scale them instead.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(source: ImageLike) -> PIL.Image.Image:
    """An 8-bit RGB `PIL.Image` from a path, a PIL image or an array.

    Transparency is composited onto white. Files are turned upright by their EXIF orientation. Arrays are HxW or HxWxC
    (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA); uint8 as is, uint16 scaled by 255/65535, floats read as [0, 1].
    16-bit PIL images (modes I;16 and I) are scaled from [0, 65535] and float images (mode F) read as [0, 1].
    """
    if isinstance(source, (str, os.PathLike)):
        image = _open_image_file(source)
    elif isinstance(source, PIL.Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    else:
        raise InputError(f"an image must be a file path, a PIL image or a numpy array, got {type(source).__name__}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"image {_describe(source)} has zero size ({image.width}x{image.height}): pass a real picture")
    return _pil_to_rgb(image, source)


def _describe(source: ImageLike) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"({type(source).__name__})"


def _open_image_file(source: str | os.PathLike) -> PIL.Image.Image:
    path = Path(source)
    if str(source).startswith(("http://", "https://")):
        raise InputError(f"{source} is a URL: download the image and pass the file path")
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a directory: pass the path of an image file")
    if not path.is_file():
        raise InputError(f"image file {str(path)!r} does not exist: check the path")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()  # decodes now, so a truncated file fails here rather than mid-resize
            image = PIL.ImageOps.exif_transpose(opened)
    except PIL.UnidentifiedImageError:
        raise InputError(f"{str(path)!r} is not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"image file {str(path)!r} is corrupt or truncated ({reason}): re-save or replace it"
        ) from None
    return image


def _pil_to_rgb(image: PIL.Image.Image, source: ImageLike) -> PIL.Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _array_to_rgb(_sixteen_bit_to_uint8(np.asarray(image)))
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image))
    try:
        # Same rule as transformers' convert_to_rgb: an alpha band or a transparency key means composite on white.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:  # modes Pillow cannot turn into RGB (e.g. LAB)
        raise InputError(
            f"image {_describe(source)} in mode {image.mode} cannot be converted to RGB ({error}): save it as RGB"
        ) from None


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0, 65535).astype(np.float64) / 257).astype(np.uint8)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values of any supported dtype -> uint8, with a clear error for values that are not pixels."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _sixteen_bit_to_uint8(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise InputError("a float image array must hold values in [0, 1]; divide 8-bit values by 255")
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"an {array.dtype} image array must hold values in [0, 255]; convert it to uint8")
        return array.astype(np.uint8)
    raise InputError(f"an image array must be uint8, uint16 or float, got {array.dtype}")


def _array_to_rgb(array: np.ndarray) -> PIL.Image.Image:
    """HxW or HxWxC array -> RGB PIL image; alpha is composited onto white the way transformers does for arrays."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)):
        raise InputError(
            f"an image array must be HxW or HxWxC with 1-4 channels, got shape {array.shape}; "
            "move channels last with array.transpose(1, 2, 0)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"image array has zero size (shape {array.shape}): pass a real picture")
    pixels = _array_to_uint8(array)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    has_alpha = pixels.shape[-1] in (2, 4)
    color = pixels[..., :-1] if has_alpha else pixels
    color = np.repeat(color, 3, axis=-1) if color.shape[-1] == 1 else color
    if has_alpha:
        alpha = pixels[..., -1:] / 255
        color = np.round(alpha * color + (1 - alpha) * 255).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(color), mode="RGB")


# ---- resizing and tiling -----------------------------------------------------------------------------------------


def _longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) with the longest edge set to `longest_edge`, the other edge scaled and rounded up to even.

    Small images grow too. The result is then shrunk to fit MAX_IMAGE_EDGE.
    """
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)

    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_EDGE:
        width, height = MAX_IMAGE_EDGE, int(MAX_IMAGE_EDGE / aspect_ratio)
    elif height > width and height > MAX_IMAGE_EDGE:
        height, width = MAX_IMAGE_EDGE, int(MAX_IMAGE_EDGE * aspect_ratio)
    return max(height, 1), max(width, 1)


def _whole_tiles_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) grown to whole tiles: the longest edge first, the other from the aspect ratio."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def _resize(image: PIL.Image.Image, height: int, width: int, resample: int) -> PIL.Image.Image:
    return image.resize((width, height), resample=PIL.Image.Resampling(resample))


def _channels_first(image: PIL.Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 [3, height, width]."""
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _split_tiles(image: PIL.Image.Image, tile: int, resample: int) -> tuple[np.ndarray, int, int]:
    """Tiles of an image whose edges are whole tiles: uint8 [rows * cols + 1, 3, tile, tile], rows, cols.

    Row-major tiles, then the whole image shrunk to one global tile. An image of a single tile is not split:
    it is returned alone with rows = cols = 0.
    """
    if image.height <= tile and image.width <= tile:
        return _channels_first(image)[None], 0, 0
    rows, cols = image.height // tile, image.width // tile
    pixels = _channels_first(image).reshape(3, rows, tile, cols, tile)
    tiles = pixels.transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    global_tile = _channels_first(_resize(image, tile, tile, resample))
    return np.concatenate([tiles, global_tile[None]]), rows, cols


def _image_tiles(image: PIL.Image.Image, config: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """One RGB image -> uint8 tiles [n, 3, tile, tile], rows, cols (0, 0 when not split)."""
    tile = config.tile_size
    if config.do_resize:
        image = _resize(image, *_longest_edge_size(image.height, image.width, config.size), config.resample)
    if not config.do_image_splitting:
        return _channels_first(_resize(image, tile, tile, config.resample))[None], 0, 0
    image = _resize(image, *_whole_tiles_size(image.height, image.width, tile), config.resample)
    return _split_tiles(image, tile, config.resample)


def _normalize(tiles: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 [..., 3, h, w] -> float32 [..., 3, h, w]: `* rescale_factor`, then `(x - mean) / std`.

    Rescaling rounds through float64 and normalizing runs in float32, the reference's own steps, so values agree
    to the last bit.
    """
    values = tiles
    if config.do_rescale:
        values = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
    values = values.astype(np.float32, copy=False)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        values = (values - mean) / std
    return values


def _pad_to_batch(per_prompt: Sequence[np.ndarray], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt float32 [n_i, 3, tile, tile] -> (pixel_values [B, N, 3, tile, tile], mask [B, N, tile, tile]).

    N = max n_i; missing tiles are zeros with a False mask.
    """
    count = max(len(tiles) for tiles in per_prompt)
    pixel_values = np.zeros((len(per_prompt), count, 3, tile, tile), dtype=np.float32)
    mask = np.zeros((len(per_prompt), count, tile, tile), dtype=bool)
    for prompt_index, tiles in enumerate(per_prompt):
        pixel_values[prompt_index, : len(tiles)] = tiles
        mask[prompt_index, : len(tiles)] = True
    return pixel_values, mask


# ---- images ------------------------------------------------------------------------------------------------------


class ProcessedImages(NamedTuple):
    """Model-ready images for a batch of prompts.

    pixel_values: float32 [B, N, 3, tile, tile]; N is the most tiles (split tiles + global) of any prompt; zero-padded.
    pixel_attention_mask: bool [B, N, tile, tile]; True on real tiles, False on padding.
    rows, cols: per prompt, per image, the tile grid (0, 0 for an image that was not split).
    """

    pixel_values: np.ndarray
    pixel_attention_mask: np.ndarray
    rows: list[list[int]]
    cols: list[list[int]]


def preprocess_images(
    images: Sequence[Sequence[ImageLike]], config: ImageProcessorConfig = ImageProcessorConfig()
) -> ProcessedImages:
    """One inner list of images per prompt (it may be empty) -> padded tiles for the whole batch."""
    _check_nested(images, "images")
    per_prompt, rows, cols = [], [], []
    for prompt_images in images:
        per_image = [_image_tiles(load_image(image), config) for image in prompt_images]
        per_prompt.append(_normalize_list([tiles for tiles, _, _ in per_image], config))
        rows.append([image_rows for _, image_rows, _ in per_image])
        cols.append([image_cols for _, _, image_cols in per_image])
    if not any(len(tiles) for tiles in per_prompt):
        raise InputError("no images were given: pass at least one image, or tokenize text-only prompts directly")
    return ProcessedImages(*_pad_to_batch(per_prompt, config.tile_size), rows, cols)


def _normalize_list(tile_groups: Sequence[np.ndarray], config: ImageProcessorConfig) -> np.ndarray:
    """uint8 tile groups [n_i, 3, tile, tile] -> one float32 [sum n_i, 3, tile, tile]."""
    return _concat_tiles([_normalize(tiles, config) for tiles in tile_groups], config.tile_size)


def _concat_tiles(tile_groups: Sequence[np.ndarray], tile: int) -> np.ndarray:
    if not tile_groups:
        return np.zeros((0, 3, tile, tile), dtype=np.float32)
    return np.concatenate(tile_groups)


def _check_nested(batch: Any, name: str) -> None:
    if not isinstance(batch, (list, tuple)) or not all(isinstance(inner, (list, tuple)) for inner in batch):
        raise InputError(f"{name} must be one list per prompt, e.g. [[first, second], []] for two prompts")


# ---- prompt strings ----------------------------------------------------------------------------------------------


def _global_image_tokens(image_seq_len: int) -> str:
    return f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{IMAGE_TOKEN * image_seq_len}{FAKE_IMAGE_TOKEN}"


def image_prompt_string(rows: int, cols: int, image_seq_len: int) -> str:
    """The tokens that stand for one image of `rows` x `cols` tiles (0, 0: a single global tile).

    Each row of tiles ends with a newline, and a blank line separates the tiles from the global tile.
    """
    if not (_is_int(rows) and _is_int(cols) and rows >= 0 and cols >= 0 and (rows == 0) == (cols == 0)):
        raise InputError(f"rows and cols must both be 0 or both positive, got rows={rows!r}, cols={cols!r}")
    if not _is_positive_int(image_seq_len):
        raise InputError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    if rows == 0:
        return _global_image_tokens(image_seq_len)
    tile_tokens = IMAGE_TOKEN * image_seq_len
    grid = "".join(
        "".join(f"{FAKE_IMAGE_TOKEN}<row_{r}_col_{c}>{tile_tokens}" for c in range(1, cols + 1)) + "\n"
        for r in range(1, rows + 1)
    )
    return f"{grid}\n{_global_image_tokens(image_seq_len)}"


def expand_image_markers(text: str, rows: Sequence[int], cols: Sequence[int], image_seq_len: int) -> str:
    """Replace the i-th `<image>` marker in `text` by the image tokens of an image of rows[i] x cols[i] tiles."""
    if len(rows) != len(cols):
        raise InputError(f"rows and cols must have one entry per image, got {len(rows)} rows and {len(cols)} cols")
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(rows):
        raise InputError(
            f"the text has {len(pieces) - 1} {IMAGE_TOKEN} markers but {len(rows)} images were given: "
            f"put one {IMAGE_TOKEN} where each image goes"
        )
    expanded = [pieces[0]]
    for image_rows, image_cols, piece in zip(rows, cols, pieces[1:]):
        expanded += [image_prompt_string(image_rows, image_cols, image_seq_len), piece]
    return "".join(expanded)


def place_image_markers(text: str, num_images: int) -> str:
    """`text` with `num_images` `<image>` markers in front when it has none; unchanged when it has any."""
    return text if IMAGE_TOKEN in text else IMAGE_TOKEN * num_images + text


_SMALL_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "zero ten twenty thirty forty fifty sixty seventy eighty ninety".split()


def _words_below_thousand(n: int) -> str:
    if n < 20:
        return _SMALL_NUMBERS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_SMALL_NUMBERS[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_SMALL_NUMBERS[hundreds]} hundred"
    return f"{head} and {_words_below_thousand(rest)}" if rest else head


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 in British style: 121 -> "one hundred and twenty-one"."""
    if not (_is_int(n) and 0 <= n < 1_000_000):
        raise InputError(f"number_words takes an integer in [0, 999999], got {n!r}")
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return _words_below_thousand(n)
    head = f"{_words_below_thousand(thousands)} thousand"
    if not rest:
        return head
    return f"{head} and {_words_below_thousand(rest)}" if rest < 100 else f"{head}, {_words_below_thousand(rest)}"


def video_prompt_string(timestamps: Sequence[float], duration: float, image_seq_len: int) -> str:
    """The text that stands for a video: an intro with the frame count and duration, then per frame
    "Frame from MM:SS:" and that frame's single-tile image tokens, then a blank line.

    timestamps: seconds of each sampled frame; duration: seconds of the whole video (whole seconds are shown).
    """
    if not timestamps:
        raise InputError("a video needs at least one frame")
    if not _is_number(duration) or duration < 0:
        raise InputError(f"video duration must be a non-negative number of seconds, got {duration!r}")
    intro = VIDEO_INTRO.format(
        frame_count=number_words(len(timestamps)), video_duration=str(timedelta(seconds=int(duration)))
    )
    frame_tokens = _global_image_tokens(image_seq_len)
    frames = "".join(
        FRAME_TIMESTAMP.format(timestamp=f"{int(second // 60):02d}:{int(second % 60):02d}") + frame_tokens
        for second in timestamps
    )
    return intro + frames + MEDIA_OUTTRO


# ---- videos ------------------------------------------------------------------------------------------------------


@dataclass
class VideoFrames:
    """Frames sampled from a video, with when each was taken.

    frames: the frames (anything `load_image` takes); timestamps: seconds of each frame; duration: seconds of video.
    """

    frames: list[ImageLike]
    timestamps: list[float]
    duration: float

    def __post_init__(self) -> None:
        if not self.frames:
            raise InputError("a video needs at least one frame")
        if len(self.timestamps) != len(self.frames):
            raise InputError(
                f"a video has {len(self.frames)} frames but {len(self.timestamps)} timestamps: give one per frame"
            )


def sampled_frame_indices(
    total_frames: int, source_fps: float, *, fps: float, max_frames: int, skip_secs: float = 1
) -> list[int]:
    """Indices of the frames to keep: about `fps` per second, at most `max_frames`, evenly spread.

    When the video is long enough, the first and last `skip_secs` seconds are left out (they are often titles).
    """
    duration = total_frames / source_fps
    wanted = max(min(int(round(fps * duration)), max_frames), 1)
    first, last = 0, total_frames - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * fps:
        first, last = int(skip_secs * source_fps), int(total_frames - skip_secs * source_fps)
    first, last = max(0, first), min(last, total_frames - 1)
    if first >= last:
        first, last = 0, total_frames - 1
    # Evenly spaced positions, rounded down to whole frames; duplicates (short videos) are dropped.
    positions = np.linspace(first, last, wanted)
    return sorted({int(position) for position in positions})


def sample_video_frames(
    frames: Sequence[ImageLike],
    source_fps: float,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    skip_secs: float = 1,
    config: ImageProcessorConfig = ImageProcessorConfig(),
) -> VideoFrames:
    """Pick frames from every frame of a video shot at `source_fps` (fps and max_frames default to the config's)."""
    if not frames:
        raise InputError("a video needs at least one frame")
    if not _is_positive_number(source_fps):
        raise InputError(f"source_fps must be a positive number, got {source_fps!r}")
    indices = sampled_frame_indices(
        len(frames),
        source_fps,
        fps=config.video_fps if fps is None else fps,
        max_frames=config.video_max_frames if max_frames is None else max_frames,
        skip_secs=skip_secs,
    )
    return VideoFrames(
        frames=[frames[i] for i in indices],
        timestamps=[i / source_fps for i in indices],
        duration=len(frames) / source_fps,
    )


def _video_frame_tile(frame: PIL.Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """One RGB frame -> uint8 [3, tile, tile]: longest edge to `video_size`, then squeezed to one square tile."""
    if config.do_resize:
        longest_edge = min(config.video_size, MAX_IMAGE_EDGE)
        frame = _resize(frame, *_longest_edge_size(frame.height, frame.width, longest_edge), config.resample)
    return _channels_first(_resize(frame, config.tile_size, config.tile_size, config.resample))


def preprocess_video(
    frames: Sequence[ImageLike] | VideoFrames, config: ImageProcessorConfig = ImageProcessorConfig()
) -> np.ndarray:
    """Video frames -> float32 [num_frames, 3, tile, tile], one unsplit tile per frame, normalized like images."""
    frame_list = frames.frames if isinstance(frames, VideoFrames) else frames
    if not isinstance(frame_list, (list, tuple)) or not frame_list:
        raise InputError("a video must be a non-empty list of frames")
    tiles = np.stack([_video_frame_tile(load_image(frame), config) for frame in frame_list])
    return _normalize(tiles, config)


# ---- processor ---------------------------------------------------------------------------------------------------


class VLMInputs(NamedTuple):
    """Model inputs for a batch of prompts.

    input_ids: per prompt, token ids (not padded). pixel_values: float32 [B, N, 3, tile, tile] or None without media.
    pixel_attention_mask: bool [B, N, tile, tile] or None. rows, cols: per prompt, per image, the tile grid.
    Tiles follow the order of the `<image>`/`<video>` markers in each prompt, as the image tokens do.
    """

    input_ids: list[list[int]]
    pixel_values: np.ndarray | None
    pixel_attention_mask: np.ndarray | None
    rows: list[list[int]]
    cols: list[list[int]]


class VLMProcessor:
    """Text + images -> model inputs, like transformers' SmolVLMProcessor, without torch."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig = ImageProcessorConfig(),
        image_seq_len: int = 64,
        chat_template: str | None = None,
    ) -> None:
        if not _is_positive_int(image_seq_len):
            raise ConfigError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
        for token in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, "<row_1_col_1>"):
            token_id = tokenizer.backend.token_to_id(token)
            if token_id is None or tokenizer.encode(token) != [token_id]:
                raise CheckpointError(
                    f"the tokenizer has no single token {token}: load the tokenizer of a SmolVLM2 checkpoint"
                )
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.image_seq_len = image_seq_len
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> VLMProcessor:
        """Tokenizer, preprocessor_config.json and processor_config.json (image_seq_len) of a model directory."""
        directory = Path(path)
        processor_config = _read_json_object(directory, "processor_config.json")
        if "image_seq_len" not in processor_config:
            raise CheckpointError(
                f"{directory / 'processor_config.json'} is missing or has no image_seq_len: "
                "copy it from the SmolVLM2 checkpoint"
            )
        return cls(
            Tokenizer.from_dir(directory),
            ImageProcessorConfig.from_dir(directory),
            image_seq_len=processor_config["image_seq_len"],
            chat_template=processor_config.get("chat_template"),
        )

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.backend.token_to_id(IMAGE_TOKEN)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text for `messages`, with an `<image>` (or `<video>`) marker where each image (video) goes.

        A message's content is a string or a list of items `{"type": "text", "text": ...}`, `{"type": "image"}`,
        `{"type": "video"}`. Uses this processor's template, else SmolVLM's own for conversations with videos (as
        transformers does), else the tokenizer's, else SmolVLM's.
        """
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise InputError('messages must be a list of dicts like {"role": "user", "content": "Hi"}')
        item_messages = [_with_content_items(message) for message in messages]
        has_video = any(
            isinstance(item, Mapping) and item.get("type") == "video"
            for message in item_messages
            for item in message.get("content") or []
        )
        template = self.chat_template or (DEFAULT_CHAT_TEMPLATE if has_video else None)
        template = template or self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        renderer = self.tokenizer
        if template != self.tokenizer.chat_template:
            renderer = copy.copy(self.tokenizer)
            renderer.chat_template = template
        return renderer.apply_chat_template(item_messages, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        prompts: Sequence[str] | str,
        images: Sequence[Sequence[ImageLike]] | None = None,
        videos: Sequence[Sequence[VideoFrames]] | None = None,
    ) -> VLMInputs:
        """Expand each prompt's `<image>`/`<video>` markers, tokenize, and preprocess the media.

        images, videos: one inner list per prompt, in the order of that prompt's markers. The tokenizer adds its
        special tokens (if it adds any) unless the prompt already starts with the BOS token, as chat prompts do.
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
            raise InputError("prompts must be a non-empty list of strings")
        image_lists = self._per_prompt(images, "images", len(prompt_list))
        video_lists = self._per_prompt(videos, "videos", len(prompt_list))
        input_ids, per_prompt_tiles, rows, cols = [], [], [], []
        for index, (prompt, prompt_images, prompt_videos) in enumerate(zip(prompt_list, image_lists, video_lists)):
            text, tiles, image_rows, image_cols = self._expand_prompt(index, prompt, prompt_images, prompt_videos)
            add_special = not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token))
            input_ids.append(self.tokenizer.encode(text, add_special_tokens=add_special))
            per_prompt_tiles.append(tiles)
            rows.append(image_rows)
            cols.append(image_cols)
        if not any(len(tiles) for tiles in per_prompt_tiles):
            return VLMInputs(input_ids, None, None, rows, cols)
        return VLMInputs(input_ids, *_pad_to_batch(per_prompt_tiles, self.image_config.tile_size), rows, cols)

    @staticmethod
    def _per_prompt(media: Any, name: str, num_prompts: int) -> list:
        if media is None:
            return [[] for _ in range(num_prompts)]
        _check_nested(media, name)
        if len(media) != num_prompts:
            raise InputError(f"{name} has {len(media)} lists for {num_prompts} prompts: give one list per prompt")
        return [list(inner) for inner in media]

    def _check_grid_tokens(self, rows: int, cols: int) -> None:
        # Without a <row_r_col_c> token the marker would be tokenized as plain text and the model misled.
        if rows and self.tokenizer.backend.token_to_id(f"<row_{rows}_col_{cols}>") is None:
            raise InputError(
                f"an image was split into {rows}x{cols} tiles but the tokenizer has no <row_{rows}_col_{cols}> token: "
                "keep do_resize on, or lower size in the preprocessor config"
            )

    def _expand_prompt(
        self, index: int, prompt: str, images: list[ImageLike], videos: list[VideoFrames]
    ) -> tuple[str, np.ndarray, list[int], list[int]]:
        """(expanded text, float32 tiles [n, 3, tile, tile] in marker order, rows, cols) for one prompt."""
        markers = _MEDIA_MARKER.findall(prompt)
        for token, given, kind in ((IMAGE_TOKEN, images, "images"), (VIDEO_TOKEN, videos, "videos")):
            if markers.count(token) != len(given):
                raise InputError(
                    f"prompt {index} has {markers.count(token)} {token} markers but {len(given)} {kind} were given: "
                    f"put one {token} where each of its {kind} goes"
                )
        if any(not isinstance(video, VideoFrames) for video in videos):
            raise InputError("each video must be a VideoFrames (frames, timestamps, duration); see sample_video_frames")
        pending_images, pending_videos = iter(images), iter(videos)
        pieces, tile_groups, rows, cols = [], [], [], []
        for piece in _MEDIA_MARKER.split(prompt):
            if piece == IMAGE_TOKEN:
                tiles, image_rows, image_cols = _image_tiles(load_image(next(pending_images)), self.image_config)
                self._check_grid_tokens(image_rows, image_cols)
                pieces.append(image_prompt_string(image_rows, image_cols, self.image_seq_len))
                tile_groups.append(_normalize(tiles, self.image_config))
                rows.append(image_rows)
                cols.append(image_cols)
            elif piece == VIDEO_TOKEN:
                video = next(pending_videos)
                pieces.append(video_prompt_string(video.timestamps, video.duration, self.image_seq_len))
                tile_groups.append(preprocess_video(video.frames, self.image_config))
            else:
                pieces.append(piece)
        return "".join(pieces), _concat_tiles(tile_groups, self.image_config.tile_size), rows, cols


def _with_content_items(message: Mapping) -> dict:
    """A copy of `message` whose string content is a one-item list, the form SmolVLM's templates read."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": [{"type": "text", "text": content}]}
    return dict(message)
