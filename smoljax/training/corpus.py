"""A small bundled corpus: the Python language reference that ships with every CPython (`pydoc_data.topics`).

Why: tests, examples and a from-scratch recipe need real English text with no download and no extra package.
`pydoc_data.topics.topics` maps a topic name ("assert", "specialnames", ...) to its plain-text documentation. Topics
range from 200 characters to 60,000, so each one is split at its section headings (a title line underlined with
`*`, `=` or `-`): one record per non-empty section, in topic-name order, then document order. The text differs
between CPython versions, so the records are deterministic for a given Python, not across Pythons.

Load them with `smoljax.training.data.load_records("builtin:pydoc-text")` or `"builtin:pydoc-chat"`.
"""

from __future__ import annotations

import re
from typing import Callable

# A heading: a line of text, then a line of one repeated underline character (`*` title, `=` section, `-` sub).
_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[*=-])(?P=rule)+[ \t]*$", re.MULTILINE)
# A sentence end: ., ! or ? (optionally closed by a quote or bracket) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s)")

ANSWER_CHARS = 600


def pydoc_sections() -> list[tuple[str, str, str]]:
    """`(topic, title, body)` for every non-empty section of every pydoc topic, topic names sorted."""
    from pydoc_data.topics import topics

    sections = []
    for topic in sorted(topics):
        text = topics[topic]
        headings = list(_HEADING.finditer(text))
        for heading, following in zip(headings, headings[1:] + [None]):
            body = text[heading.end() : following.start() if following else len(text)].strip()
            if body:
                sections.append((topic, heading["title"].strip(), body))
    return sections


def pydoc_text_records() -> list[dict]:
    """`[{"text": ..., "topic": ..., "title": ...}, ...]`: one pretraining-style document per section.

    The text is the section as printed (heading, underline, body), so documents read like the original.
    """
    return [
        {"text": f"{title}\n{'=' * len(title)}\n\n{body}\n", "topic": topic, "title": title}
        for topic, title, body in pydoc_sections()
    ]


def pydoc_chat_records() -> list[dict]:
    """`[{"messages": [user question, assistant answer]}, ...]`: one question per section.

    The answer is the start of the section (at most `ANSWER_CHARS` characters, cut at a paragraph or sentence end),
    so a model fine-tuned on it learns the chat format on real, checkable text.
    """
    return [
        {
            "messages": [
                {"role": "user", "content": f"What does the Python documentation say in the section {title!r}?"},
                {"role": "assistant", "content": excerpt(body, ANSWER_CHARS)},
            ]
        }
        for _, title, body in pydoc_sections()
    ]


def excerpt(text: str, limit: int) -> str:
    """The start of `text`, at most `limit` characters, cut at the last paragraph end, else sentence end, else space.

    A cut point is only taken when it keeps at least a third of `limit`, so an early paragraph break does not leave
    a one-line answer.
    """
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # one more character, so a sentence ending exactly at `limit` is seen to end
    floor = limit // 3
    cut = head.rfind("\n\n", 0, limit)
    if cut < floor:
        ends = [match.end() for match in _SENTENCE_END.finditer(head) if match.end() <= limit]
        cut = ends[-1] if ends and ends[-1] >= floor else head.rfind(" ", 0, limit)
    if cut < floor:
        cut = limit
    return text[:cut].rstrip()


# `builtin:NAME` sources of `load_records`.
BUILTIN_SOURCES: dict[str, Callable[[], list[dict]]] = {
    "pydoc-text": pydoc_text_records,
    "pydoc-chat": pydoc_chat_records,
}
