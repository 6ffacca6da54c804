"""smoljax.tokenizer against transformers' tokenizer for the real SmolLM2-135M-Instruct GGUF.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, which builds its own tokenizer from the same
GGUF metadata. transformers has no entry for llama.cpp's "smollm" pre-tokenizer, so it falls back to plain GPT-2
byte-level pre-tokenization and loses the `Digits(individual_digits=True)` step of SmolLM2's tokenizer.json. Where
whitespace comes before a number character the ids change:
  "a  1": SmolLM2 gives a|ĠĠ|1, the fallback a|Ġ|Ġ|1 (GPT-2's regex gives the last space to " 1");
  " ½":   SmolLM2 gives Ġ|Â½,   the fallback ĠÂ|½   (" ½" is one pre-token, and the merge "Ġ Â" exists).
So the token-for-token reference is transformers' GGUF tokenizer with SmolLM2's tokenizer.json pre-tokenizer put
back, and the unpatched one is checked to agree with us wherever no number character follows whitespace.
"""

import json
import re
import unicodedata

import pytest
import tokenizers
from gguf import GGUFReader

from smoljax.errors import InputError, SmolJaxError
from smoljax.tokenizer import Tokenizer

# The pre_tokenizer section of HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer.json, verbatim. llama.cpp's
# "smollm" pre-tokenizer is the same two steps: split off every \p{N} character, then apply the GPT-2 regex.
SMOLLM2_PRE_TOKENIZER_JSON = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

LONG_MIXED = (
    "Chapter 12: The year 2024 saw 3,141 visitors.\n\n"
    "def mean(values):\n    return sum(values) / len(values)  # O(n)\n\n"
    "Le café coûte 2,50 € — très cher! Größe: 1.85 m. Tiếng Việt có dấu.\n"
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.\n"
    "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🎉\n"
    "<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n"
    "\tTabs\tand  double  spaces   and trailing   \n"
) * 6

CORPUS = {
    "empty": "",
    "english": "The quick brown fox doesn't jump over the lazy dog; it's \"tired\" (really) — isn't it?",
    "python": (
        "import numpy as np\n\n\nclass Point:\n    def __init__(self, x: float, y: float) -> None:\n"
        "        self.x, self.y = x, y\n\n    def norm(self):\n\treturn np.hypot(self.x, self.y)\n"
    ),
    "french": "L'été dernier, nous sommes allés à Paris; c'était très agréable, n'est-ce pas?",
    "german": "Die Größe der Straße übertrifft alle Erwartungen: Äpfel, Öl und Übermut.",
    "vietnamese": "Tiếng Việt là ngôn ngữ chính thức của Việt Nam, với nhiều dấu thanh.",
    "cjk": "漢字とひらがなとカタカナ。中文简体和繁體中文。한국어 문장입니다.",
    "emoji": "Hi 👋🏾 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 astronaut 🧑🏻‍🚀 keycap 1️⃣!",
    "whitespace": "  leading\tand\ttabs\n\n\nnewlines   spaces \r\n crlf \u00a0nbsp   ",
    "numbers": "In 2024, 1234567890 people paid $3.14 or 1,000.50 (≈10%) for 42nd-place x² ½ ١٢٣ １２３.",
    "spaces_before_digits": "x =  42\n    1. item\n\n2024\ta\t\t7 end  99",
    "special_tokens": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|><|endoftext|><file_sep>",
    "special_tokens_glued": "a<|im_end|>b <|im_start|> <jupyter_code>print(1)",
    "long_mixed": LONG_MIXED,
}


def number_after_whitespace(text: str) -> bool:
    """Where GPT-2 pre-tokenization and SmolLM2's Digits-first one can disagree: whitespace, then a \\p{N} char."""
    pairs = zip(text, text[1:])
    return any(previous.isspace() and unicodedata.category(char).startswith("N") for previous, char in pairs)


def smollm2_pre_tokenizer() -> tokenizers.pre_tokenizers.PreTokenizer:
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": SMOLLM2_PRE_TOKENIZER_JSON, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "vocab": {}, "merges": []},
    }  # fmt: skip
    return tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json)).pre_tokenizer


# ---- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_metadata(real_gguf_path) -> dict:
    reader = GGUFReader(real_gguf_path)
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(gguf_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="module")
def hf_gguf(real_gguf_path):
    """transformers' tokenizer built from the GGUF metadata, as it comes."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(real_gguf_path.parent), gguf_file=real_gguf_path.name)


@pytest.fixture(scope="module")
def hf_reference_dir(hf_gguf, tmp_path_factory):
    """transformers' GGUF tokenizer saved by transformers, with SmolLM2's tokenizer.json pre-tokenizer put back."""
    directory = tmp_path_factory.mktemp("hf_reference")
    hf_gguf.save_pretrained(directory)
    tokenizer_file = directory / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer_json["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER_JSON
    tokenizer_file.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def hf_reference(hf_reference_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(hf_reference_dir))


# ---- encode / decode -----------------------------------------------------------------------------------------------


def test_special_tokens_and_sizes(ours, hf_gguf):
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.special_tokens_map() == hf_gguf.special_tokens_map
    assert ours.vocab_size == len(hf_gguf) == 49152
    assert ours.special_ids == frozenset(range(17))  # <|endoftext|> .. <empty_output>
    assert ours.stop_token_ids() == {ours.eos_token_id, 0}  # <|im_end|>, and <|endoftext|> ends any document


def test_digits_are_single_pre_tokens_as_in_smollm2_tokenizer_json(ours):
    assert ours.backend.pre_tokenizer.pre_tokenize_str("In 2024,  12 apples") == [
        ("In", (0, 2)), ("Ġ", (2, 3)), ("2", (3, 4)), ("0", (4, 5)), ("2", (5, 6)), ("4", (6, 7)),
        (",", (7, 8)), ("ĠĠ", (8, 10)), ("1", (10, 11)), ("2", (11, 12)), ("Ġapples", (12, 19)),
    ]  # fmt: skip
    reference = smollm2_pre_tokenizer()
    for text in CORPUS.values():
        assert ours.backend.pre_tokenizer.pre_tokenize_str(text) == reference.pre_tokenize_str(text)
    vocab = ours.backend.get_vocab()
    assert ours.encode("a  1") == [vocab["a"], vocab["ĠĠ"], vocab["1"]]
    assert ours.encode("2024") == [vocab[digit] for digit in "2024"]
    assert ours.encode(" ½") == [vocab["Ġ"], vocab["Â½"]]


@pytest.mark.parametrize("name", CORPUS)
def test_encode_decode_match_transformers(name, ours, hf_reference):
    text = CORPUS[name]
    ids = ours.encode(text)
    assert ids == hf_reference.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == hf_reference.encode(text, add_special_tokens=True)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf_reference.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids) == text  # byte-level BPE loses nothing


def test_unpatched_transformers_gguf_tokenizer_agrees_away_from_numbers_after_whitespace(ours, hf_gguf):
    for text in CORPUS.values():
        if not number_after_whitespace(text):
            assert ours.encode(text) == hf_gguf.encode(text, add_special_tokens=False)


def test_gpt2_pre_tokenizer_variant_matches_unpatched_transformers(gguf_metadata, hf_gguf):
    """With llama.cpp's "gpt-2" pre-tokenizer we build what transformers built: the gap is the pre-tokenizer alone."""
    plain = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": "gpt-2"})
    for text in CORPUS.values():
        assert plain.encode(text) == hf_gguf.encode(text, add_special_tokens=False)


def test_decode_accepts_numpy_ids(ours):
    np = pytest.importorskip("numpy")
    ids = ours.encode("Hello, world")
    assert ours.decode(np.asarray(ids, dtype=np.int32)) == "Hello, world"
    assert ours.decode([]) == ""


def test_add_bos_token_from_gguf_metadata_survives_save(gguf_metadata, tmp_path):
    import transformers

    with_bos = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("Hi 12", add_special_tokens=True) == [with_bos.bos_token_id, *with_bos.encode("Hi 12")]
    with_bos.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.encode("Hi 12") == with_bos.encode("Hi 12", add_special_tokens=True)


# ---- chat templates ------------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to 3 in Größe-free German: 1, 2, 3."},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(name, add_generation_prompt, ours, hf_gguf):
    messages = CONVERSATIONS[name]
    kwargs = {"add_generation_prompt": add_generation_prompt}
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == hf_gguf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == hf_gguf.apply_chat_template(
        messages, tokenize=True, return_dict=False, **kwargs
    )
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_template_helpers_match_transformers(ours, hf_gguf):
    """tojson, raise_exception, strftime_now, loop controls, extra variables and the special-token variables."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}\n  {{ m | tojson }}|{{ strftime_now('%Y') }}|{{ greeting }}"
        "{% generation %}{{ eos_token }}{% endgeneration %}\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "<b>é</b>"}, {"role": "assistant", "content": "ok", "name": None}]
    expected = hf_gguf.apply_chat_template(messages, chat_template=template, tokenize=False, greeting="salut")
    ours_with_template = Tokenizer(ours.backend, **ours.special_tokens_map(), chat_template=template)
    assert ours_with_template.apply_chat_template(messages, add_generation_prompt=False, greeting="salut") == expected
    with pytest.raises(InputError, match="no tools"):
        ours_with_template.apply_chat_template([{"role": "tool", "content": "x"}])


# ---- save / load ---------------------------------------------------------------------------------------------------


def test_save_then_transformers_loads_it_identically(ours, tmp_path):
    import transformers

    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.chat_template == ours.chat_template
    assert loaded.special_tokens_map == ours.special_tokens_map()
    for text in CORPUS.values():
        assert loaded.encode(text, add_special_tokens=False) == ours.encode(text)
        assert loaded.encode(text, add_special_tokens=True) == ours.encode(text, add_special_tokens=True)
    messages = CONVERSATIONS["multi_turn"]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        ours.apply_chat_template(messages)
    )
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.special_tokens_map() == ours.special_tokens_map()
    assert reloaded.chat_template == ours.chat_template
    assert all(reloaded.encode(text) == ours.encode(text) for text in CORPUS.values())


def test_save_refuses_to_overwrite(ours, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(SmolJaxError, match="already exists"):
        ours.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"


def test_from_dir_reads_a_transformers_saved_directory(hf_reference_dir, hf_reference):
    loaded = Tokenizer.from_dir(hf_reference_dir)  # transformers wrote the template to chat_template.jinja
    assert loaded.chat_template == hf_reference.chat_template
    assert loaded.special_tokens_map() == hf_reference.special_tokens_map
    for text in CORPUS.values():
        assert loaded.encode(text) == hf_reference.encode(text, add_special_tokens=False)


def test_from_dir_chat_template_precedence(ours, tmp_path):
    Tokenizer(ours.backend, **ours.special_tokens_map(), chat_template="from config").save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert Tokenizer.from_dir(tmp_path).chat_template == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from jinja"


# ---- bad input -----------------------------------------------------------------------------------------------------


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value) and str(error.value)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(SmolJaxError, match="no tokenizer.json") as error:
        Tokenizer.from_dir(tmp_path)
    assert_one_line(error)


def test_corrupt_tokenizer_json(ours, tmp_path):
    ours.save(tmp_path)
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text(encoding="utf-8")[:5000], encoding="utf-8")  # truncated
    with pytest.raises(SmolJaxError, match="not a valid tokenizer.json") as error:
        Tokenizer.from_dir(tmp_path)
    assert_one_line(error)


def test_corrupt_tokenizer_config(ours, tmp_path):
    ours.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(SmolJaxError, match="not valid JSON") as error:
        Tokenizer.from_dir(tmp_path)
    assert_one_line(error)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tokenizer.ggml.model", "llama", "unsupported GGUF tokenizer model 'llama'"),
        ("tokenizer.ggml.pre", "qwen2", "unsupported GGUF pre-tokenizer 'qwen2'"),
        ("tokenizer.ggml.eos_token_id", 10**6, "outside the 49152-token vocab"),
    ],
)
def test_unsupported_gguf_tokenizer(gguf_metadata, key, value, message):
    with pytest.raises(SmolJaxError, match=re.escape(message)) as error:
        Tokenizer.from_gguf_metadata({**gguf_metadata, key: value})
    assert_one_line(error)


def test_gguf_without_merges(gguf_metadata):
    incomplete = {key: value for key, value in gguf_metadata.items() if key != "tokenizer.ggml.merges"}
    with pytest.raises(SmolJaxError, match="no tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(incomplete)


@pytest.mark.parametrize("bad_ids", [[5, 49152], [-1], [[1, 2]]])
def test_decode_rejects_bad_ids(ours, bad_ids):
    with pytest.raises(InputError) as error:
        ours.decode(bad_ids)
    assert_one_line(error)
    if bad_ids != [[1, 2]]:
        assert "valid ids are 0..49151" in str(error.value)


def test_chat_template_error_is_one_input_error(ours):
    with pytest.raises(InputError, match="could not render") as error:
        ours.apply_chat_template([{"role": "user", "content": ["not", "a str"]}])  # SmolLM2's template adds strings
    assert_one_line(error)
    with pytest.raises(InputError, match="list of dicts"):
        ours.apply_chat_template("Hi")


def test_no_chat_template(ours):
    without_template = Tokenizer(ours.backend, **ours.special_tokens_map(), chat_template=None)
    with pytest.raises(SmolJaxError, match="no chat template.*generate") as error:
        without_template.apply_chat_template(CONVERSATIONS["user"])
    assert_one_line(error)
