"""Fine-tuning data: records -> token ids with loss masks -> packed, shifted, fixed-shape batches.

Why this shape: a jitted train step wants fixed [batch, seq_len] arrays, so documents are packed into rows with
`segment_ids` (documents never attend to each other) and `positions` (restarting per document), and the next-token
targets are built here, on the host, so the loss is a plain masked cross-entropy with nothing to shift.

Pipeline, each step a small function usable on its own:

    load_records(source)            .jsonl file | builtin:pydoc-text | builtin:pydoc-chat | hf:NAME[:SPLIT]
    tokenize_record(record, tok)    (ids int32 [n], loss_mask bool [n]); chat: loss on assistant turns only
    pack_documents(docs, seq_len)   rows of inputs/targets/masks (tests, eval)
    TrainBatches(records, tok, cfg) infinite, shuffled per epoch, resumable exactly from `state()`

Batch contract (every array [batch_size, seq_len]):
    tokens      int32    input ids; the pad id where a row is empty
    targets     int32    the next token of the same document; 0 where not trained
    loss_mask   float32  1.0 where the target token is trained, else 0.0
    segment_ids int32    1, 2, 3, ... per document piece in the row; 0 for padding
    positions   int32    position within the document piece, from 0

A document piece of m tokens fills m - 1 slots: inputs are its tokens [0, m-1), targets its tokens [1, m), so a
target never crosses into another document. Host-side numpy only: no jax here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from smoljax.errors import ConfigError, InputError
from smoljax.tokenizer import Tokenizer

FORMATS = ("auto", "text", "chat")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
STATE_VERSION = 1

Document = tuple[np.ndarray, np.ndarray]  # (ids int32 [n], loss_mask bool [n])


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become batches. Validated by `validate_data_config`."""

    source: str  # jsonl path, builtin:..., or hf:...
    seq_len: int = 2048
    batch_size: int = 8  # rows per optimizer step (global batch)
    format: str = "auto"  # auto | text | chat
    text_key: str = "text"
    messages_key: str = "messages"
    pack: bool = True
    assistant_only_loss: bool = True
    seed: int = 0
    shuffle: bool = True


def validate_data_config(config: DataConfig) -> None:
    """Raise a one-line ConfigError for the first bad field."""
    for name in ("seq_len", "batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"data {name} must be a positive integer, got {value!r}")
    if config.format not in FORMATS:
        raise ConfigError(f"data format must be one of {list(FORMATS)}, got {config.format!r}")
    for name in ("text_key", "messages_key"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ConfigError(f"data {name} must be a non-empty string, got {getattr(config, name)!r}")
    for name in ("pack", "assistant_only_loss", "shuffle"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"data {name} must be true or false, got {getattr(config, name)!r}")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or config.seed < 0:
        raise ConfigError(f"data seed must be a non-negative integer, got {config.seed!r}")
    if not isinstance(config.source, str) or not config.source:
        raise ConfigError(f"data source must be a .jsonl path, builtin:NAME or hf:NAME, got {config.source!r}")


# ---- records -------------------------------------------------------------------------------------------------------


def load_records(source: str, *, split: str = "train") -> list[dict]:
    """Examples as dicts from a `.jsonl` file, `builtin:pydoc-text` / `builtin:pydoc-chat`, or `hf:NAME[:SPLIT]`.

    `hf:NAME:CONFIG:SPLIT` names a dataset config too; `split` is the split when the source names none.
    """
    if source.startswith("builtin:"):
        from smoljax.training.corpus import BUILTIN_SOURCES

        name = source.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            known = ", ".join(f"builtin:{known}" for known in BUILTIN_SOURCES)
            raise InputError(f"unknown data source {source!r}: the builtin sources are {known}")
        return BUILTIN_SOURCES[name]()
    if source.startswith("hf:"):
        return _load_hf(source, split)
    return _load_jsonl(Path(source))


def _load_jsonl(path: Path) -> list[dict]:
    if path.suffix != ".jsonl":
        raise InputError(f"data source {str(path)!r} is not a .jsonl file, builtin:NAME or hf:NAME[:SPLIT]")
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    records = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"line {number} of {path}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where} is not valid JSON: {error.msg} at column {error.colno}") from None
            if not isinstance(record, dict):
                raise InputError(f"{where} is a JSON {type(record).__name__}, not an object like {{\"text\": ...}}")
            records.append(record)
    return records


def _load_hf(source: str, split: str) -> list[dict]:
    parts = source.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise InputError(f"bad data source {source!r}: write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config_name = parts[0], parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else split
    try:
        import datasets
    except ImportError:
        raise InputError(f"data source {source!r} needs the `datasets` package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except Exception as error:  # datasets raises many types (network, missing split, bad name)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"could not load {source!r} with datasets.load_dataset: {reason}") from None
    return [dict(row) for row in dataset]


# ---- tokenizing one example ----------------------------------------------------------------------------------------


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    format: str = "auto",
    text_key: str = "text",
    messages_key: str = "messages",
    assistant_only_loss: bool = True,
) -> Document:
    """`(ids int32 [n], loss_mask bool [n])` of one example; `loss_mask[i]` says whether token i is trained as a target.

    text: the text's tokens then EOS (nothing prepended: SmolLM2 trains without BOS), loss on every token.
    chat: the chat template's rendering with no generation prompt; with `assistant_only_loss`, loss only on the tokens
    of assistant turns (content and end-of-turn token, not the `<|im_start|>assistant\\n` header), else everywhere.
    auto: chat if the record has `messages_key`, else text if it has `text_key`.
    """
    if not isinstance(record, Mapping):
        raise InputError(f"a data record must be a dict, got {type(record).__name__}")
    if format == "auto":
        format = "chat" if messages_key in record else "text" if text_key in record else "missing"
    if format == "missing":
        raise InputError(f"a data record has neither {messages_key!r} nor {text_key!r}: its keys are {sorted(record)}")
    if format == "text":
        return _tokenize_text(_field(record, text_key, str), tokenizer)
    if format == "chat":
        return _tokenize_chat(_field(record, messages_key, list), tokenizer, assistant_only_loss)
    raise ConfigError(f"data format must be one of {list(FORMATS)}, got {format!r}")


def _field(record: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in record:
        raise InputError(f"a data record has no {key!r}: its keys are {sorted(record)}")
    if not isinstance(record[key], kind):
        raise InputError(f"a data record's {key!r} is a {type(record[key]).__name__}, not a {kind.__name__}")
    return record[key]


def _tokenize_text(text: str, tokenizer: Tokenizer) -> Document:
    ids = tokenizer.encode(text) + ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)


def _tokenize_chat(messages: list, tokenizer: Tokenizer, assistant_only_loss: bool) -> Document:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    if not assistant_only_loss:
        return ids, np.ones(len(ids), bool)
    mask = np.zeros(len(ids), bool)
    starts, ends = np.asarray(encoding.offsets, np.int64).reshape(-1, 2).T
    for start, end in assistant_spans(messages, _template_renderer(tokenizer), text):
        mask |= (starts < end) & (ends > start)  # tokens overlapping the assistant's characters
    return ids, mask


def _template_renderer(tokenizer: Tokenizer) -> Callable[[list, bool], str]:
    return lambda messages, add_generation_prompt: tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: list, render: Callable[[list, bool], str], text: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the assistant turns in `text`, the full rendering of `messages` by
    `render(messages, add_generation_prompt)` (a tokenizer's or a VLM processor's chat template).

    Found from the template itself: rendering `messages[:i]` with the generation prompt gives the text before turn
    i's content; rendering `messages[:i + 1]` ends after its end-of-turn token (trailing whitespace not included).
    Works for any template that renders a conversation's prefixes as prefixes of the whole.
    """
    spans = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through) and len(through) >= len(before)):
            raise InputError(
                "the chat template does not render conversation prefixes as prefixes of the whole conversation, "
                f"so assistant turn {i} cannot be located: set assistant_only_loss to false"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


# ---- packing -------------------------------------------------------------------------------------------------------


class _Row:
    """One row of a batch being filled: arrays [seq_len] and the number of slots used."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.used, self.segments = seq_len, 0, 0
        self.arrays = {
            "tokens": np.full(seq_len, pad_id, np.int32),
            "targets": np.zeros(seq_len, np.int32),
            "loss_mask": np.zeros(seq_len, np.float32),
            "segment_ids": np.zeros(seq_len, np.int32),
            "positions": np.zeros(seq_len, np.int32),
        }

    @property
    def free(self) -> int:
        return self.seq_len - self.used

    def add(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        """Append a piece of m <= free + 1 tokens as a new segment of m - 1 slots; skip it if nothing is trained."""
        m = len(ids)
        if m < 2 or not mask[1:].any():
            return False
        self.segments += 1
        slots = slice(self.used, self.used + m - 1)
        self.arrays["tokens"][slots] = ids[:-1]
        self.arrays["targets"][slots] = np.where(mask[1:], ids[1:], 0)
        self.arrays["loss_mask"][slots] = mask[1:]
        self.arrays["segment_ids"][slots] = self.segments
        self.arrays["positions"][slots] = np.arange(m - 1)
        self.used += m - 1
        return True


Pending = tuple[int, int]  # (document key, offset of its first token not yet placed)


def _fill_row(
    row: _Row,
    pending: Pending | None,
    next_key: Callable[[], int | None],
    lookup: Callable[[int], Document],
    *,
    pack: bool,
    max_idle: int | None = None,
) -> Pending | None:
    """Fill `row` from the pending document, then from `next_key()` documents; return what is still pending.

    pack=True, greedily in order: a document that fits in the free space goes in whole; one longer than a whole row
    (> seq_len + 1 tokens) fills the free space and continues in the next row (the cut token is the last target of
    one piece and the first input of the next, so no pair is lost); any other document closes the row (padding)
    and waits for the next one: examples that fit a row are never cut, at the cost of some padding.
    pack=False: one document per row, truncated to seq_len + 1 tokens.
    `next_key()` returns None when the documents run out. After `max_idle` documents in a row with nothing placed,
    no document has anything to train on: InputError.
    """
    idle = 0
    while row.free:
        if pending is None:
            key = next_key()
            if key is None:
                return None
            idle += 1
            if max_idle is not None and idle > max_idle:
                raise InputError(
                    "no example in the data has a token to train on (with assistant_only_loss, check that examples "
                    "have assistant turns, and that they start within seq_len + 1 tokens when pack is false)"
                )
            pending = (key, 0)
        key, offset = pending
        ids, mask = lookup(key)
        ids, mask = ids[offset:], mask[offset:]
        if not pack:
            pending = None
            if row.add(ids[: row.free + 1], mask[: row.free + 1]):
                return None
        elif len(ids) - 1 <= row.free:
            pending = None
            idle = 0 if row.add(ids, mask) else idle
        elif len(ids) - 1 > row.seq_len:
            cut = row.free
            pending = (key, offset + cut)
            idle = 0 if row.add(ids[: cut + 1], mask[: cut + 1]) else idle
        else:
            return pending
    return pending


def pack_documents(documents: Sequence[Document], seq_len: int, *, pack: bool = True, pad_id: int = 0) -> dict:
    """Pack `documents` in order into as many rows as they need: the batch contract's arrays, each [rows, seq_len]."""
    keys = iter(range(len(documents)))
    rows, pending = [], None
    while True:
        row = _Row(seq_len, pad_id)
        pending = _fill_row(row, pending, lambda: next(keys, None), documents.__getitem__, pack=pack)
        if row.used == 0:
            return _stack(rows, seq_len, pad_id)
        rows.append(row)


def _stack(rows: list[_Row], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    if not rows:
        return {key: np.zeros((0, seq_len), array.dtype) for key, array in _Row(seq_len, pad_id).arrays.items()}
    return {key: np.stack([row.arrays[key] for row in rows]) for key in BATCH_KEYS}


# ---- shuffled, resumable training batches --------------------------------------------------------------------------


def epoch_order(num_records: int, seed: int, epoch: int, *, shuffle: bool = True) -> Sequence[int]:
    """Record indices in epoch `epoch`'s order: a random-access permutation depending only on (seed, epoch)."""
    if not shuffle:
        return range(num_records)
    import grain

    # grain's own per-epoch seeds are seed + epoch, so (seed 0, epoch 1) would repeat (seed 1, epoch 0); mix first.
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return grain.MapDataset.range(num_records).shuffle(seed=epoch_seed)


class TrainBatches:
    """Infinite iterator of training batches (see the module docstring for the arrays), deterministic and resumable.

    Records are visited in a fresh permutation each epoch (`epoch_order`), tokenized as they are reached (cached by
    record index), and packed into rows; `batch_size` rows make a batch. `state()` is the exact position (epoch,
    next index in that epoch's order, and the document split across rows, if any); `TrainBatches(..., state=s)` or
    `restore(s)` continues with exactly the batches an uninterrupted iterator would give.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        config: DataConfig,
        *,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        validate_data_config(config)
        if len(records) == 0:
            raise InputError(f"the data source {config.source!r} has no examples")
        self.records, self.tokenizer, self.config = records, tokenizer, config
        self.pad_id = _pad_id(tokenizer)
        self._cache: dict[int, Document] = {}
        self._epoch, self._index, self._pending = 0, 0, None
        self._order = epoch_order(len(records), config.seed, 0, shuffle=config.shuffle)
        if state is not None:
            self.restore(state)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.config.batch_size):
            row = _Row(self.config.seq_len, self.pad_id)
            # 2 * len(records) documents in a row span a whole epoch: if none placed anything, none ever will.
            self._pending = _fill_row(
                row, self._pending, self._next_key, self.document,
                pack=self.config.pack, max_idle=2 * len(self.records),
            )  # fmt: skip
            rows.append(row)
        return _stack(rows, self.config.seq_len, self.pad_id)

    def document(self, index: int) -> Document:
        """`tokenize_record` of record `index` with the config's options; cached."""
        if index not in self._cache:
            self._cache[index] = _tokenize_example(self.records, index, self.tokenizer, self.config)
        return self._cache[index]

    def _next_key(self) -> int:
        if self._index == len(self.records):
            self._epoch, self._index = self._epoch + 1, 0
            self._order = epoch_order(len(self.records), self.config.seed, self._epoch, shuffle=self.config.shuffle)
        self._index += 1
        return int(self._order[self._index - 1])

    @property
    def epoch(self) -> int:
        """The epoch of the next document to be read (0-based)."""
        return self._epoch

    def state(self) -> dict[str, Any]:
        """The exact position, JSON-serialisable; plus the settings it is only valid for."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "index": self._index,
            "pending": None if self._pending is None else list(self._pending),
            "check": self._check(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from `state()` of an iterator over the same records, tokenizer and config."""
        try:
            version, epoch, index, pending, check = (
                state[key] for key in ("version", "epoch", "index", "pending", "check")
            )
        except (KeyError, TypeError):
            raise InputError("the data iterator state is not a dict saved by TrainBatches.state()") from None
        if version != STATE_VERSION:
            raise InputError(f"data iterator state version {version!r} is not {STATE_VERSION}: it cannot be resumed")
        if check != self._check():
            raise InputError(
                f"the data iterator state was saved for {check}, not {self._check()}: resume with the same data config"
            )
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(index, int) and 0 <= index <= len(self.records)):
            raise InputError(f"the data iterator state has a bad position: epoch {epoch!r}, index {index!r}")
        self._epoch, self._index = epoch, index
        self._order = epoch_order(len(self.records), self.config.seed, epoch, shuffle=self.config.shuffle)
        self._pending = None if pending is None else (int(pending[0]), int(pending[1]))

    def _check(self) -> dict[str, Any]:
        config = self.config
        return {
            "records": len(self.records), "seq_len": config.seq_len, "seed": config.seed, "shuffle": config.shuffle,
            "pack": config.pack, "format": config.format, "assistant_only_loss": config.assistant_only_loss,
        }  # fmt: skip


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _tokenize_example(
    records: Sequence[Mapping[str, Any]], index: int, tokenizer: Tokenizer, config: DataConfig
) -> Document:
    try:
        return tokenize_record(
            records[index], tokenizer, format=config.format, text_key=config.text_key,
            messages_key=config.messages_key, assistant_only_loss=config.assistant_only_loss,
        )  # fmt: skip
    except InputError as error:
        raise InputError(f"example {index} of {config.source}: {error}") from None


def eval_batches(
    records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, config: DataConfig, max_batches: int | None = None
) -> list[dict[str, np.ndarray]]:
    """A fixed validation set: the records in order (no shuffle), packed, cut into batches of `config.batch_size` rows.

    The last batch is filled up with empty rows (loss_mask 0), so every batch has the training shape.
    """
    validate_data_config(config)
    documents = [_tokenize_example(records, i, tokenizer, config) for i in range(len(records))]
    pad_id = _pad_id(tokenizer)
    rows = pack_documents(documents, config.seq_len, pack=config.pack, pad_id=pad_id)
    total = len(rows["tokens"])
    if total == 0:
        raise InputError(f"no example in {config.source!r} has a token to evaluate on")
    count = -(-total // config.batch_size)
    count = count if max_batches is None else min(count, max_batches)
    empty = _Row(config.seq_len, pad_id).arrays
    out = []
    for b in range(count):
        batch = {key: value[b * config.batch_size : (b + 1) * config.batch_size] for key, value in rows.items()}
        missing = config.batch_size - len(batch["tokens"])
        if missing:
            batch = {key: np.concatenate([value, np.stack([empty[key]] * missing)]) for key, value in batch.items()}
        out.append(batch)
    return out
