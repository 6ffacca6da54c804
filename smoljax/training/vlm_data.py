"""Image + text chat batches for fine-tuning SmolVLM2.

A record is a chat with its images, in the order of the conversation's image items:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["cat.jpg"]}                   # paths relative to the .jsonl file, or absolute

Each example is one row (no packing: the image tokens of one prompt must stay whole), loss on the assistant turns.
The text arrays are those of `smoljax.training.data` ([B, T]); the tiles of each micro-batch are padded to a fixed
`max_tiles`, so every step has the same shapes:

    pixel_values  float32 [accum_steps * max_tiles, 3, S, S]   micro-batch m's tiles at [m * max_tiles, ...)
    pixel_mask    bool    [accum_steps * max_tiles, S, S]      padding tiles are all False

An example longer than seq_len (its image tokens cannot be cut) or with more tiles than max_tiles is skipped and
counted in `state()["skipped"]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from smoljax.config import VLMConfig
from smoljax.errors import ConfigError, InputError
from smoljax.training.data import DataConfig, assistant_spans, epoch_order, validate_data_config

TILES_PER_FULL_IMAGE = 17  # a 2048-pixel image: 4 x 4 tiles of 512 plus the global one


def _image_paths(record: Mapping[str, Any], base_dir: Path) -> list[Path]:
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise InputError("a SmolVLM2 record's 'images' must be a list of image paths")
    return [path if path.is_absolute() else base_dir / path for path in map(Path, images)]


def _marker_messages(messages: list) -> list:
    """Messages whose image items carry no payload (the processor's template only needs to see where they are)."""
    def clean(item):
        if isinstance(item, Mapping) and item.get("type") == "video":
            raise InputError("video items are not supported in training data yet; give the frames as images")
        return {"type": "image"} if isinstance(item, Mapping) and item.get("type") == "image" else item
    return [{**message, "content": [clean(item) for item in message["content"]]}
            if isinstance(message, Mapping) and isinstance(message.get("content"), list) else message
            for message in messages]


def tokenize_vlm_record(record: Mapping[str, Any], processor: Any, base_dir: Path, *, messages_key: str = "messages",
                        assistant_only_loss: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One example -> (ids int32 [n], loss_mask bool [n], tiles float32 [k, 3, S, S], tile masks bool [k, S, S])."""
    from smoljax.processor import expand_image_markers

    messages = record.get(messages_key)
    if not isinstance(messages, list):
        raise InputError(f"a SmolVLM2 record needs {messages_key!r}: a list of chat messages")
    messages = _marker_messages(messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    inputs = processor([text], [[str(path) for path in _image_paths(record, base_dir)]])
    rows, cols = inputs.rows[0], inputs.cols[0]
    # The processor's own token ids, and the same text tokenized with character offsets for the loss mask.
    expanded = expand_image_markers(text, rows, cols, processor.image_seq_len)
    encoding = processor.tokenizer.backend.encode(expanded, add_special_tokens=False)
    ids = np.asarray(inputs.input_ids[0], np.int32)
    if list(encoding.ids) != list(ids):
        raise InputError("the expanded prompt does not re-tokenize to the processor's ids; "
                         "set data.assistant_only_loss to false for this tokenizer")
    if assistant_only_loss:
        marker_spans = assistant_spans(messages, lambda m, g: processor.apply_chat_template(m, g), text)
        spans = [_shift_past_images(span, text, rows, cols, processor.image_seq_len) for span in marker_spans]
        starts, ends = np.asarray(encoding.offsets, np.int64).reshape(-1, 2).T
        mask = np.zeros(len(ids), bool)
        for start, end in spans:
            mask |= (starts < end) & (ends > start)
    else:
        mask = np.ones(len(ids), bool)
    if inputs.pixel_values is None:
        size = processor.image_config.max_image_size
        return ids, mask, np.zeros((0, 3, size, size), np.float32), np.zeros((0, size, size), bool)
    count = sum(1 if r == 0 else r * c + 1 for r, c in zip(rows, cols))
    return ids, mask, inputs.pixel_values[0, :count], inputs.pixel_attention_mask[0, :count]


def _shift_past_images(span: tuple[int, int], text: str, rows: list[int], cols: list[int],
                       image_seq_len: int) -> tuple[int, int]:
    """A character span of the marker text -> the same characters in the text with every `<image>` expanded."""
    from smoljax.processor import IMAGE_TOKEN, image_prompt_string

    def shift(position: int) -> int:
        offset, start = 0, 0
        for r, c in zip(rows, cols):
            found = text.find(IMAGE_TOKEN, start)
            if found < 0 or found >= position:
                break
            offset += len(image_prompt_string(r, c, image_seq_len)) - len(IMAGE_TOKEN)
            start = found + len(IMAGE_TOKEN)
        return position + offset
    return shift(span[0]), shift(span[1])


class VLMBatches:
    """Infinite, deterministic, resumable iterator of SmolVLM2 batches (see the module docstring)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], processor: Any, config: VLMConfig, data: DataConfig, *,
                 max_tiles: int = 0, accum_steps: int = 1, state: Mapping[str, Any] | None = None) -> None:
        validate_data_config(data)
        if processor is None:
            raise ConfigError("SmolVLM2 training needs the model's processor files (preprocessor_config.json, "
                              "processor_config.json) next to its weights")
        if not records:
            raise InputError(f"the data source {data.source!r} has no examples")
        if data.batch_size % accum_steps:
            raise ConfigError(f"batch_size {data.batch_size} does not split into accum_steps={accum_steps}")
        self.records, self.processor, self.config, self.data = records, processor, config, data
        self.rows_per_micro = data.batch_size // accum_steps
        self.accum_steps = accum_steps
        self.max_tiles = max_tiles or self.rows_per_micro * TILES_PER_FULL_IMAGE
        source = Path(data.source)
        self.base_dir = source.parent if source.suffix == ".jsonl" else Path.cwd()
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self._epoch, self._index, self._pending, self._skipped = 0, 0, None, 0
        self._order = epoch_order(len(records), data.seed, 0, shuffle=data.shuffle)
        if state is not None:
            self.restore(state)

    def __iter__(self) -> VLMBatches:
        return self

    def _next_example(self) -> tuple[np.ndarray, ...]:
        """The next usable example in epoch order (deferred one first), skipping those that cannot fit."""
        for _ in range(2 * len(self.records) + 1):
            if self._pending is not None:
                index, self._pending = self._pending, None
            else:
                if self._index == len(self._order):
                    self._epoch, self._index = self._epoch + 1, 0
                    self._order = epoch_order(len(self.records), self.data.seed, self._epoch,
                                              shuffle=self.data.shuffle)
                index = int(self._order[self._index])
                self._index += 1
            example = tokenize_vlm_record(self.records[index], self.processor, self.base_dir,
                                          messages_key=self.data.messages_key,
                                          assistant_only_loss=self.data.assistant_only_loss)
            ids, mask, tiles, _ = example
            if len(ids) <= self.data.seq_len + 1 and len(tiles) <= self.max_tiles and mask[1:].any():
                return (index, *example)
            self._skipped += 1
        raise InputError(f"no example of {self.data.source!r} fits seq_len={self.data.seq_len} + 1 tokens and "
                         f"max_tiles={self.max_tiles} with a trained token; raise data.seq_len or data.max_tiles")

    def _micro_batch(self) -> dict[str, np.ndarray]:
        seq_len, size = self.data.seq_len, self.processor.image_config.max_image_size
        rows = self.rows_per_micro
        batch = {"tokens": np.full((rows, seq_len), self.pad_id, np.int32),
                 "targets": np.zeros((rows, seq_len), np.int32),
                 "loss_mask": np.zeros((rows, seq_len), np.float32),
                 "segment_ids": np.zeros((rows, seq_len), np.int32),
                 "positions": np.zeros((rows, seq_len), np.int32),
                 "pixel_values": np.zeros((self.max_tiles, 3, size, size), np.float32),
                 "pixel_mask": np.zeros((self.max_tiles, size, size), bool)}
        used_tiles = 0
        for row in range(rows):
            index, ids, mask, tiles, tile_masks = self._next_example()
            if used_tiles + len(tiles) > self.max_tiles:
                self._pending = index  # goes first into the next micro-batch; this row stays padding
                break
            length = len(ids) - 1
            batch["tokens"][row, :length] = ids[:-1]
            batch["targets"][row, :length] = ids[1:]
            batch["loss_mask"][row, :length] = mask[1:]
            batch["segment_ids"][row, :length] = 1
            batch["positions"][row, :length] = np.arange(length)
            batch["pixel_values"][used_tiles:used_tiles + len(tiles)] = tiles
            batch["pixel_mask"][used_tiles:used_tiles + len(tiles)] = tile_masks
            used_tiles += len(tiles)
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        micro_batches = [self._micro_batch() for _ in range(self.accum_steps)]
        return {key: np.concatenate([micro[key] for micro in micro_batches]) for key in micro_batches[0]}

    def state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index, "pending": self._pending, "skipped": self._skipped}

    def restore(self, state: Mapping[str, Any]) -> None:
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
            pending = None if state.get("pending") is None else int(state["pending"])
            skipped = int(state.get("skipped", 0))
        except (KeyError, TypeError, ValueError):
            raise InputError("the saved data position is not a SmolVLM2 batch position; resume with the recipe that "
                             "wrote it") from None
        self._order = epoch_order(len(self.records), self.data.seed, epoch, shuffle=self.data.shuffle)
        if not 0 <= index <= len(self._order):
            raise InputError(f"the saved data position {index} is outside this dataset of {len(self._order)} examples")
        self._epoch, self._index, self._pending, self._skipped = epoch, index, pending, skipped
