"""The small JSON files around a checkpoint (tokenizer, processor and preprocessor configs): read and written in one
place, so a malformed file always gives the same clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from smoljax.errors import CheckpointError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, {} when the file is absent; CheckpointError when it is not a valid JSON object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-download or re-save it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(value).__name__}")
    return value


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
