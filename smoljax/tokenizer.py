"""Tokenizer: HF `tokenizers` for text <-> ids, jinja2 for chat templates.

Loads from a HF model directory (`tokenizer.json` + `tokenizer_config.json`) or from a GGUF file's metadata, and
saves in the HF layout so `transformers.AutoTokenizer.from_pretrained` reads it back. Chat templates render the way
transformers renders them (sandboxed jinja2, trim_blocks, lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from smoljax.errors import CheckpointError, InputError, SmolJaxError
from smoljax.jsonfiles import read_json_object, write_json

# llama.cpp's `tokenizer.ggml.token_type` values that mark tokens matched whole in the text.
GGUF_CONTROL_TOKEN = 3
GGUF_USER_DEFINED_TOKEN = 4

# `tokenizer.ggml.pre` -> whether each digit is its own pre-token before GPT-2's byte-level regex. SmolLM2's
# tokenizer.json is Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]; llama.cpp's "smollm"
# pre-tokenizer is the same two steps ("\p{N}", then the GPT-2 regex).
GGUF_PRE_SPLITS_DIGITS = {"smollm": True, "gpt-2": False}

# Tokens that end a turn or a document in common formats; stop tokens wherever the vocabulary has them as specials.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")

SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
GGUF_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "pad_token": "padding_token_id",
    "unk_token": "unknown_token_id",
}


class Tokenizer:
    """Byte-level BPE tokenizer with the model's special tokens and chat template.

    Attributes:
        backend: the `tokenizers.Tokenizer` doing the work.
        bos_token, eos_token, pad_token, unk_token: special token strings, or None where the model has none.
        chat_template: the jinja2 chat template, or None.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        for role, token in self.special_tokens_map().items():
            if backend.token_to_id(token) is None:
                raise CheckpointError(f"the tokenizer's {role} {token!r} is not in its vocabulary; the files disagree")

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and `tokenizer_config.json` from a HF model directory.

        The chat template comes from `chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`,
        the order in which transformers prefers them. `encode(add_special_tokens=True)` adds what tokenizer.json's
        post-processor adds.
        """
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"no tokenizer.json in {directory}: pass a model directory saved by transformers or smoljax"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for bad JSON or a bad schema
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                f"{tokenizer_file} is not a valid tokenizer.json ({reason}); re-download or re-save it"
            ) from None
        config = read_json_object(directory / "tokenizer_config.json")
        return cls(
            backend,
            **{role: _token_content(config.get(role)) for role in SPECIAL_TOKEN_ROLES},
            chat_template=_chat_template_in_dir(directory, config),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its raw key/values (plain python values)."""
        tokens = list(_required(metadata, "tokenizer.ggml.tokens"))
        special = {role: _gguf_special_token(metadata, key, tokens) for role, key in GGUF_SPECIAL_TOKEN_IDS.items()}
        backend = _gguf_byte_level_bpe(metadata, tokens)
        adds_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
        backend.post_processor = _post_processor(backend, bos_token=special["bos_token"] if adds_bos else None)
        return cls(backend, **special, chat_template=metadata.get("tokenizer.chat_template"))

    # ---- special tokens ------------------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (control tokens such as `<|im_start|>`)."""
        return frozenset(i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)

    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, plus end-of-turn/-document specials (`<|im_end|>`, `<|endoftext|>`) present."""
        end_of_turn = {self.backend.token_to_id(token) for token in END_OF_TURN_TOKENS} & self.special_ids
        return frozenset(end_of_turn | ({self.eos_token_id} - {None}))

    def special_tokens_map(self) -> dict[str, str]:
        """`{"bos_token": ..., ...}` for the roles this model fills; also the variables chat templates see."""
        return {role: getattr(self, role) for role in SPECIAL_TOKEN_ROLES if getattr(self, role) is not None}

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ---- text <-> ids --------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their single ids.

        `add_special_tokens` adds what the tokenizer's post-processor adds (BOS for models that want it).
        """
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of token ids (a list, numpy or jax array)."""
        id_list = _as_id_list(ids)
        out_of_range = [i for i in id_list if not 0 <= i < self.vocab_size]
        if out_of_range:
            raise InputError(f"token id {out_of_range[0]} is out of range: valid ids are 0..{self.vocab_size - 1}")
        return self.backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` (`[{"role": ..., "content": ...}, ...]`) with the model's chat template.

        Extra keyword arguments become template variables, as in transformers. Returns the prompt text, or its ids
        (encoded without adding special tokens: the template writes them) when `tokenize` is true.
        """
        if self.chat_template is None:
            raise SmolJaxError(
                "this model has no chat template: write the prompt text yourself and use `generate` instead"
            )
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise InputError('messages must be a list of dicts like {"role": "user", "content": "Hi"}')
        # As transformers does: a key set to None is dropped, since templates test for presence, not for None.
        plain_messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        variables = {**self.special_tokens_map(), "tools": None, "documents": None, **template_kwargs}
        try:
            text = _compile_chat_template(self.chat_template).render(
                messages=plain_messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except (jinja2.TemplateError, TypeError) as error:  # TypeError: e.g. list content where a str is expected
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(f"the chat template could not render these messages: {reason}") from None
        return self.encode(text) if tokenize else text

    # ---- saving --------------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout) into `directory`.

        Refuses to overwrite existing tokenizer files, so nothing already there is lost.
        """
        directory = Path(directory)
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        existing = [name for name in names if (directory / name).exists()]
        if existing:
            raise SmolJaxError(
                f"{directory / existing[0]} already exists: save into a new directory or remove it first"
            )
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as is, pre-tokenizer included
            "clean_up_tokenization_spaces": False,
            **self.special_tokens_map(),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(directory / "tokenizer_config.json", config)
        write_json(directory / "special_tokens_map.json", self.special_tokens_map())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


# ---- building blocks ---------------------------------------------------------------------------------------------


def _byte_level_pre_tokenizer(*, split_digits: bool) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def _gguf_byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise CheckpointError(
            f"unsupported GGUF tokenizer model {model_type!r}: smoljax reads byte-level BPE ('gpt2') tokenizers only"
        )
    pre_type = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre_type not in GGUF_PRE_SPLITS_DIGITS:
        supported = sorted(GGUF_PRE_SPLITS_DIGITS)
        raise CheckpointError(f"unsupported GGUF pre-tokenizer {pre_type!r}: smoljax supports {supported}")
    merges = [tuple(merge.split(" ", 1)) for merge in _required(metadata, "tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(split_digits=GGUF_PRE_SPLITS_DIGITS[pre_type])
    backend.decoder = decoders.ByteLevel()
    token_types = [int(token_type) for token_type in metadata.get("tokenizer.ggml.token_type", [])]
    # Registered as added tokens so that they are matched whole and never cut by the pre-tokenizer.
    backend.add_special_tokens(_added_tokens(tokens, token_types, GGUF_CONTROL_TOKEN, special=True))
    backend.add_tokens(_added_tokens(tokens, token_types, GGUF_USER_DEFINED_TOKEN, special=False))
    return backend


def _gguf_special_token(metadata: Mapping[str, Any], id_key: str, tokens: list[str]) -> str | None:
    token_id = metadata.get(f"tokenizer.ggml.{id_key}")
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise CheckpointError(f"GGUF tokenizer.ggml.{id_key} {int(token_id)} is outside the {len(tokens)}-token vocab")
    return tokens[int(token_id)]


def _post_processor(backend: tokenizers.Tokenizer, *, bos_token: str | None) -> processors.PostProcessor:
    if bos_token is None:
        return processors.ByteLevel(trim_offsets=False)  # adds no tokens; keeps byte-level offsets right
    return processors.TemplateProcessing(
        single=f"{bos_token} $A",
        pair=f"{bos_token} $A {bos_token}:1 $B:1",
        special_tokens=[(bos_token, backend.token_to_id(bos_token))],
    )


def _added_tokens(tokens: list[str], token_types: list[int], wanted_type: int, *, special: bool) -> list[AddedToken]:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == wanted_type
    ]


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise CheckpointError(f"the GGUF metadata has no {key}: the file is not a complete tokenizer")
    return metadata[key]


def _as_id_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.size == 0:
        return []
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"decode takes a 1-D sequence of integer ids, got shape {array.shape} of {array.dtype}")
    return array.tolist()


def _token_content(value: str | Mapping | None) -> str | None:
    # tokenizer_config.json writes a special token as a string, or as an AddedToken dict with "content".
    return value.get("content") if isinstance(value, Mapping) else value


def _chat_template_in_dir(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    legacy = read_json_object(directory / "chat_template.json")
    return _default_template(legacy.get("chat_template", config.get("chat_template")))


def _default_template(template: str | list | None) -> str | None:
    # Some configs hold several named templates: [{"name": "default", "template": ...}, ...].
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        return named.get("default")
    return template


# ---- chat template environment (mirrors transformers' `_compile_jinja_template`) ----------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise CheckpointError(
            f"the model's chat template is not valid jinja2 (line {error.lineno}: {error.message})"
        ) from None
